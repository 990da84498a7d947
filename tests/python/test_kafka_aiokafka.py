"""The Kafka plugin against aiokafka, the asyncio Kafka client: an idempotent producer with
keys and headers, a group consumer that commits, and the next member of the group resuming
after the commit, on a real gateway with its embedded broker. Every wait is bounded."""
import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from test_kafka import TIMEOUT, create_topic, kafka, topic_name  # noqa: F401 (fixture)


async def produce(bootstrap: str, topic: str, start: int, count: int) -> list:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(
                topic, value=f"v{i}".encode(), key=f"k{i}".encode(), partition=0, headers=[("n", str(i).encode())]
            )
            for i in range(start, start + count)
        ]
        return [m.offset for m in sent]
    finally:
        await producer.stop()


async def read_and_commit(bootstrap: str, topic: str, group: str, count: int) -> list:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        got = []
        async with asyncio.timeout(TIMEOUT):
            while len(got) < count:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    got.extend(records)
        await consumer.commit()
        return got
    finally:
        await consumer.stop()


def test_aiokafka_produces_consumes_in_a_group_and_resumes_after_its_commit(kafka):  # noqa: F811
    topic, group = topic_name(), f"g-{topic_name()}"
    create_topic(kafka, topic)

    async def scenario():
        assert await produce(kafka.bootstrap, topic, 0, 10) == list(range(10))
        first = await read_and_commit(kafka.bootstrap, topic, group, 10)
        assert [(r.offset, r.key, r.value) for r in first] == [
            (i, f"k{i}".encode(), f"v{i}".encode()) for i in range(10)
        ]
        assert list(first[4].headers) == [("n", b"4")]
        assert await produce(kafka.bootstrap, topic, 10, 5) == list(range(10, 15))
        # The next member of the group starts after the commit: only the new records.
        second = await read_and_commit(kafka.bootstrap, topic, group, 5)
        assert [r.offset for r in second] == list(range(10, 15))

    asyncio.run(scenario())
