// Drives the gateway's demo page (gateway/src/demo.html) in headless Chromium, as a person
// would: fills the token and the topic, connects, publishes from the page, and waits for
// messages that other clients publish. Run by tests/python/test_demo_page.py, which starts
// the gateway and the other clients.
//
// Argument: one JSON object
//   { url, token, topic, pageMessage, expected: [payload, ...], screenshot, timeoutMs }
// Standard output, one line each:
//   "ready"            the page is connected and shows its own message: publish now;
//   "seen <payload>"   an expected payload is in the page's message list;
//   "done"             all were seen (exit 0).
// Standard input: a line "go" after the other clients published.
// Any failure or a deadline passed: the reason on standard error, exit 1. The screenshot is
// saved in every case once the page has loaded.

import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const args = JSON.parse(process.argv[2] ?? "{}");
const timeoutMs = args.timeoutMs ?? 30000;
const deadline = Date.now() + timeoutMs;
const left = () => Math.max(1, deadline - Date.now());

// The whole run is bounded, whatever hangs.
const watchdog = setTimeout(() => {
  process.stderr.write(`demo_page: no result within ${timeoutMs} ms\n`);
  process.exit(1);
}, timeoutMs + 10000);

const lines = createInterface({ input: process.stdin });
const nextLine = () =>
  new Promise((resolve, reject) => {
    lines.once("line", resolve);
    lines.once("close", () => reject(new Error("standard input closed")));
  });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_BIN || "/usr/bin/chromium",
  headless: true,
  // Chromium's sandbox refuses to start as root, which is how tests run here.
  args: process.getuid?.() === 0 ? ["--no-sandbox"] : [],
  timeout: left(),
});
let page;
let status = 1;
try {
  page = await browser.newPage({ viewport: { width: 1200, height: 760 } });
  page.on("console", (m) => process.stderr.write(`page console: ${m.text()}\n`));
  page.on("pageerror", (e) => process.stderr.write(`page error: ${e.message}\n`));
  await page.goto(args.url, { timeout: left() });

  await page.fill("#token", args.token ?? "");
  await page.fill("#topic", args.topic);
  await page.click("#connect");
  await page.locator("#status.ok").waitFor({ timeout: left() });

  await page.fill("#message", args.pageMessage);
  await page.fill("#properties", "source=page");
  await page.click("#send");
  await shown(args.pageMessage);
  console.log("ready");

  await nextLine();
  for (const payload of args.expected ?? []) {
    await shown(payload);
    console.log(`seen ${payload}`);
  }
  console.log("done");
  status = 0;
} catch (e) {
  process.stderr.write(`demo_page: ${e.message}\n`);
  if (page) {
    const list = await page.locator("#messages").innerText().catch(() => "?");
    const log = await page.locator("#log").innerText().catch(() => "?");
    const state = await page.locator("#status").innerText().catch(() => "?");
    process.stderr.write(`status: ${state}\nmessages:\n${list}\nlog:\n${log}\n`);
  }
} finally {
  if (page && args.screenshot) {
    await page
      .screenshot({ path: args.screenshot, fullPage: true, timeout: 10000 })
      .catch((e) => process.stderr.write(`screenshot failed: ${e.message}\n`));
  }
  await browser.close().catch(() => {});
  clearTimeout(watchdog);
  lines.close();
}
process.exit(status);

/** Waits until a message with exactly this payload is in the page's list. */
async function shown(payload) {
  await page
    .locator("#messages li.message")
    .filter({ has: page.getByText(payload, { exact: true }) })
    .first()
    .waitFor({ timeout: left() });
}
