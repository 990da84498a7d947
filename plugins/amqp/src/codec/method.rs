//! Methods (AMQP 0-9-1 §4.2.4, the classes of the specification's XML with RabbitMQ's
//! extensions: `exchange.bind`/`unbind`, `basic.nack`, `confirm`, `connection.blocked`):
//! one struct per method with the specification's field names, and [`Method`], their union,
//! which decodes a method frame's payload and encodes one.
//!
//! The table below is the whole grammar: each line names a method, its class and method
//! ids, and its fields with their wire types; the macro writes the structs and the codec.

use super::table::FieldTable;
use super::wire::{Put, Reader};
use super::CodecError;

macro_rules! ty {
    (u8) => { u8 };
    (u16) => { u16 };
    (u32) => { u32 };
    (u64) => { u64 };
    (bit) => { bool };
    (shortstr) => { String };
    (longstr) => { Vec<u8> };
    (table) => { FieldTable };
}

macro_rules! rd {
    ($r:ident, u8) => {
        $r.u8()?
    };
    ($r:ident, u16) => {
        $r.u16()?
    };
    ($r:ident, u32) => {
        $r.u32()?
    };
    ($r:ident, u64) => {
        $r.u64()?
    };
    ($r:ident, bit) => {
        $r.bit()?
    };
    ($r:ident, shortstr) => {
        $r.shortstr()?
    };
    ($r:ident, longstr) => {
        $r.longstr()?.to_vec()
    };
    ($r:ident, table) => {
        FieldTable::read($r)?
    };
}

macro_rules! wr {
    ($p:ident, u8, $v:expr) => {
        $p.u8(*$v);
    };
    ($p:ident, u16, $v:expr) => {
        $p.u16(*$v);
    };
    ($p:ident, u32, $v:expr) => {
        $p.u32(*$v);
    };
    ($p:ident, u64, $v:expr) => {
        $p.u64(*$v);
    };
    ($p:ident, bit, $v:expr) => {
        $p.bit(*$v);
    };
    ($p:ident, shortstr, $v:expr) => {
        $p.shortstr($v);
    };
    ($p:ident, longstr, $v:expr) => {
        $p.longstr($v);
    };
    ($p:ident, table, $v:expr) => {
        $v.write($p);
    };
}

macro_rules! methods {
    ($( $(#[$doc:meta])* $name:ident ($class:literal, $id:literal, $spec:literal) { $($field:ident : $t:ident),* $(,)? } )*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, PartialEq, Default)]
            pub struct $name { $(pub $field: ty!($t),)* }
        )*

        /// A method of any class.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Method {
            $( $name($name), )*
        }

        impl Method {
            /// Class id and method id.
            pub fn ids(&self) -> (u16, u16) {
                match self { $( Method::$name(_) => ($class, $id), )* }
            }

            /// The specification's name, `class.method`.
            pub fn name(&self) -> &'static str {
                match self { $( Method::$name(_) => $spec, )* }
            }

            /// Decodes a method frame's payload (class id, method id, arguments).
            pub fn read(payload: &[u8]) -> Result<Method, CodecError> {
                let mut r = Reader::new(payload);
                let class = r.u16()?;
                let id = r.u16()?;
                #[allow(unused_variables)]
                let r = &mut r;
                match (class, id) {
                    $( ($class, $id) => Ok(Method::$name($name { $($field: rd!(r, $t),)* })), )*
                    _ => Err(CodecError::UnknownMethod(class, id)),
                }
            }

            /// Appends the method frame's payload.
            pub fn write(&self, out: &mut Vec<u8>) {
                let (class, id) = self.ids();
                let p = &mut Put::new(out);
                p.u16(class).u16(id);
                match self {
                    $( #[allow(unused_variables)] Method::$name(m) => { $( wr!(p, $t, &m.$field); )* } )*
                }
            }
        }
    };
}

methods! {
    /// §1.4.2.1
    ConnectionStart(10, 10, "connection.start") { version_major: u8, version_minor: u8, server_properties: table, mechanisms: longstr, locales: longstr }
    ConnectionStartOk(10, 11, "connection.start-ok") { client_properties: table, mechanism: shortstr, response: longstr, locale: shortstr }
    ConnectionSecure(10, 20, "connection.secure") { challenge: longstr }
    ConnectionSecureOk(10, 21, "connection.secure-ok") { response: longstr }
    ConnectionTune(10, 30, "connection.tune") { channel_max: u16, frame_max: u32, heartbeat: u16 }
    ConnectionTuneOk(10, 31, "connection.tune-ok") { channel_max: u16, frame_max: u32, heartbeat: u16 }
    ConnectionOpen(10, 40, "connection.open") { virtual_host: shortstr, reserved_1: shortstr, reserved_2: bit }
    ConnectionOpenOk(10, 41, "connection.open-ok") { reserved_1: shortstr }
    ConnectionClose(10, 50, "connection.close") { reply_code: u16, reply_text: shortstr, class_id: u16, method_id: u16 }
    ConnectionCloseOk(10, 51, "connection.close-ok") {}
    /// RabbitMQ extension.
    ConnectionBlocked(10, 60, "connection.blocked") { reason: shortstr }
    ConnectionUnblocked(10, 61, "connection.unblocked") {}
    /// RabbitMQ extension.
    ConnectionUpdateSecret(10, 70, "connection.update-secret") { new_secret: longstr, reason: shortstr }
    ConnectionUpdateSecretOk(10, 71, "connection.update-secret-ok") {}

    /// §1.5.2
    ChannelOpen(20, 10, "channel.open") { reserved_1: shortstr }
    ChannelOpenOk(20, 11, "channel.open-ok") { reserved_1: longstr }
    ChannelFlow(20, 20, "channel.flow") { active: bit }
    ChannelFlowOk(20, 21, "channel.flow-ok") { active: bit }
    ChannelClose(20, 40, "channel.close") { reply_code: u16, reply_text: shortstr, class_id: u16, method_id: u16 }
    ChannelCloseOk(20, 41, "channel.close-ok") {}

    /// §1.6.2
    ExchangeDeclare(40, 10, "exchange.declare") { reserved_1: u16, exchange: shortstr, kind: shortstr, passive: bit, durable: bit, auto_delete: bit, internal: bit, no_wait: bit, arguments: table }
    ExchangeDeclareOk(40, 11, "exchange.declare-ok") {}
    ExchangeDelete(40, 20, "exchange.delete") { reserved_1: u16, exchange: shortstr, if_unused: bit, no_wait: bit }
    ExchangeDeleteOk(40, 21, "exchange.delete-ok") {}
    /// RabbitMQ extension.
    ExchangeBind(40, 30, "exchange.bind") { reserved_1: u16, destination: shortstr, source: shortstr, routing_key: shortstr, no_wait: bit, arguments: table }
    ExchangeBindOk(40, 31, "exchange.bind-ok") {}
    ExchangeUnbind(40, 40, "exchange.unbind") { reserved_1: u16, destination: shortstr, source: shortstr, routing_key: shortstr, no_wait: bit, arguments: table }
    ExchangeUnbindOk(40, 51, "exchange.unbind-ok") {}

    /// §1.7.2
    QueueDeclare(50, 10, "queue.declare") { reserved_1: u16, queue: shortstr, passive: bit, durable: bit, exclusive: bit, auto_delete: bit, no_wait: bit, arguments: table }
    QueueDeclareOk(50, 11, "queue.declare-ok") { queue: shortstr, message_count: u32, consumer_count: u32 }
    QueueBind(50, 20, "queue.bind") { reserved_1: u16, queue: shortstr, exchange: shortstr, routing_key: shortstr, no_wait: bit, arguments: table }
    QueueBindOk(50, 21, "queue.bind-ok") {}
    QueuePurge(50, 30, "queue.purge") { reserved_1: u16, queue: shortstr, no_wait: bit }
    QueuePurgeOk(50, 31, "queue.purge-ok") { message_count: u32 }
    QueueDelete(50, 40, "queue.delete") { reserved_1: u16, queue: shortstr, if_unused: bit, if_empty: bit, no_wait: bit }
    QueueDeleteOk(50, 41, "queue.delete-ok") { message_count: u32 }
    QueueUnbind(50, 50, "queue.unbind") { reserved_1: u16, queue: shortstr, exchange: shortstr, routing_key: shortstr, arguments: table }
    QueueUnbindOk(50, 51, "queue.unbind-ok") {}

    /// §1.8.2
    BasicQos(60, 10, "basic.qos") { prefetch_size: u32, prefetch_count: u16, global: bit }
    BasicQosOk(60, 11, "basic.qos-ok") {}
    BasicConsume(60, 20, "basic.consume") { reserved_1: u16, queue: shortstr, consumer_tag: shortstr, no_local: bit, no_ack: bit, exclusive: bit, no_wait: bit, arguments: table }
    BasicConsumeOk(60, 21, "basic.consume-ok") { consumer_tag: shortstr }
    BasicCancel(60, 30, "basic.cancel") { consumer_tag: shortstr, no_wait: bit }
    BasicCancelOk(60, 31, "basic.cancel-ok") { consumer_tag: shortstr }
    BasicPublish(60, 40, "basic.publish") { reserved_1: u16, exchange: shortstr, routing_key: shortstr, mandatory: bit, immediate: bit }
    BasicReturn(60, 50, "basic.return") { reply_code: u16, reply_text: shortstr, exchange: shortstr, routing_key: shortstr }
    BasicDeliver(60, 60, "basic.deliver") { consumer_tag: shortstr, delivery_tag: u64, redelivered: bit, exchange: shortstr, routing_key: shortstr }
    BasicGet(60, 70, "basic.get") { reserved_1: u16, queue: shortstr, no_ack: bit }
    BasicGetOk(60, 71, "basic.get-ok") { delivery_tag: u64, redelivered: bit, exchange: shortstr, routing_key: shortstr, message_count: u32 }
    BasicGetEmpty(60, 72, "basic.get-empty") { reserved_1: shortstr }
    BasicAck(60, 80, "basic.ack") { delivery_tag: u64, multiple: bit }
    BasicReject(60, 90, "basic.reject") { delivery_tag: u64, requeue: bit }
    BasicRecoverAsync(60, 100, "basic.recover-async") { requeue: bit }
    BasicRecover(60, 110, "basic.recover") { requeue: bit }
    BasicRecoverOk(60, 111, "basic.recover-ok") {}
    /// RabbitMQ extension.
    BasicNack(60, 120, "basic.nack") { delivery_tag: u64, multiple: bit, requeue: bit }

    /// RabbitMQ extension: publisher confirms.
    ConfirmSelect(85, 10, "confirm.select") { no_wait: bit }
    ConfirmSelectOk(85, 11, "confirm.select-ok") {}

    /// §1.9.2
    TxSelect(90, 10, "tx.select") {}
    TxSelectOk(90, 11, "tx.select-ok") {}
    TxCommit(90, 20, "tx.commit") {}
    TxCommitOk(90, 21, "tx.commit-ok") {}
    TxRollback(90, 30, "tx.rollback") {}
    TxRollbackOk(90, 31, "tx.rollback-ok") {}
}

impl Method {
    /// Whether content (a header frame and body frames) follows the method (§4.2.6).
    pub fn has_content(&self) -> bool {
        matches!(
            self,
            Method::BasicPublish(_)
                | Method::BasicReturn(_)
                | Method::BasicDeliver(_)
                | Method::BasicGetOk(_)
        )
    }
}
