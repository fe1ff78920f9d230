// The console in Debian's Chromium, driven by Playwright (playwright-core: no browser download).
// Run by tests/e2e/browser.rs against a real keypool, which passes:
//   KP_CONSOLE  the console's origin        KP_API      the proxy's origin
//   KP_ADMIN    the admin token             KP_CLIENT   a client token for /v1
//   KP_PYTHON   a python with the openai SDK
//   KP_SECRETS  JSON list of strings no page and no answer may ever contain
// Exits non-zero, naming the step, when anything is not as it should be.
"use strict";

const assert = require("node:assert/strict");
const { execFileSync } = require("node:child_process");
const { chromium } = require("playwright-core");

const env = process.env;
const SECRETS = JSON.parse(env.KP_SECRETS || "[]");
const TIMEOUT = 15000;

async function chat(path, token) {
  const resp = await fetch(`${env.KP_API}${path}`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: "Hello from the browser test" }] }),
  });
  await resp.text();
  return { status: resp.status, key: resp.headers.get("x-keypool-upstream") };
}

async function step(name, f) {
  try {
    await f();
    console.log(`ok: ${name}`);
  } catch (e) {
    console.error(`FAILED: ${name}: ${e && e.stack ? e.stack : e}`);
    throw e;
  }
}

async function main() {
  const browser = await chromium.launch({
    executablePath: env.KP_CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
  });
  const page = await browser.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  // every answer the page received, for the no-secret check
  const answers = [];
  page.on("response", async (r) => {
    if (r.url().includes("/api/events")) return; // a stream: never finishes
    try { answers.push({ url: r.url(), text: await r.text() }); } catch (_) { /* a navigation */ }
  });
  let generated = "";

  await step("a wrong token is refused", async () => {
    await page.goto(`${env.KP_CONSOLE}/`);
    await page.waitForSelector("#login:not([hidden])");
    await page.fill("#token", "not-the-admin-token");
    await page.click("#login-form button[type=submit]");
    await page.waitForFunction(() => document.querySelector("#login-error").textContent.length > 0);
    assert.equal(await page.isVisible("#nav"), false);
  });

  await step("logs in with the admin token", async () => {
    await page.fill("#token", env.KP_ADMIN);
    await page.click("#login-form button[type=submit]");
    await page.waitForSelector("#nav:not([hidden])");
    await page.waitForSelector("#overview:not([hidden])");
  });

  await step("sees the keys and a chart with data after traffic", async () => {
    for (let i = 0; i < 6; i++) assert.equal((await chat("/v1/chat/completions", env.KP_CLIENT)).status, 200);
    await page.click("a[data-page=keys]");
    await page.waitForSelector('#keys-table tr[data-key="a"]');
    await page.waitForSelector('#keys-table tr[data-key="b"]');
    const healthy = await page.textContent('#keys-table tr[data-key="a"] td:nth-child(3)');
    assert.equal(healthy.trim(), "healthy");
    await page.click("a[data-page=overview]");
    // the rollups count the traffic once the usage writer flushed it: reload the page's data
    for (let i = 0; ; i++) {
      const points = Number((await page.getAttribute("#chart-hours", "data-points")) || 0);
      if (points >= 6) break;
      assert.ok(i < 40, `the chart has ${points} calls, not 6`);
      await page.evaluate(() => window.dispatchEvent(new HashChangeEvent("hashchange")));
      await page.waitForTimeout(500);
    }
    await page.waitForSelector("#chart-hours canvas");
    // the live numbers follow the stream
    for (let i = 0; i < 3; i++) await chat("/v1/chat/completions", env.KP_CLIENT);
    await page.waitForFunction(() => Number(document.querySelector("#ov-rpm").textContent) >= 3);
    if (env.KP_SCREENSHOTS) await page.screenshot({ path: `${env.KP_SCREENSHOTS}/overview.png`, fullPage: true });
  });

  await step("creates a gateway and calls it with the openai SDK", async () => {
    await page.click("a[data-page=gateways]");
    await page.fill("#gateway-form textarea", JSON.stringify({ name: "browser-team", models: ["gpt-4o-mini"] }));
    await page.check("#gateway-form input[name=generate]");
    await page.click("#gateway-form button[type=submit]");
    await page.waitForSelector("#gateway-form .secret:not([hidden])");
    generated = (await page.textContent("#gateway-secret")).trim();
    assert.match(generated, /^kp-[0-9a-f]{48}$/);
    await page.waitForSelector('#gateways-table tr[data-gateway="browser-team"]');
    const out = execFileSync(env.KP_PYTHON, ["-c", [
      "import sys",
      "from openai import OpenAI",
      "c = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2])",
      "r = c.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'Hello'}])",
      "print(r.choices[0].message.content)",
    ].join("\n"), `${env.KP_API}/llm/api/browser-team/v1`, generated], { encoding: "utf8" });
    assert.match(out, /Hello/);
  });

  await step("a validator's message is shown for a bad spec", async () => {
    await page.fill("#gateway-form textarea", JSON.stringify({ name: "bad", rate_limits: ["nonsense"] }));
    await page.uncheck("#gateway-form input[name=generate]");
    await page.click("#gateway-form button[type=submit]");
    await page.waitForFunction(() => document.querySelector("#gateway-form .error").textContent.includes("rate_limits"));
  });

  await step("disables a key and requests avoid it", async () => {
    await page.click("a[data-page=keys]");
    await page.click('#keys-table tr[data-key="a"] button.toggle');
    await page.waitForFunction(() => {
      const row = document.querySelector('#keys-table tr[data-key="a"]');
      return row && row.querySelector("td:nth-child(9)").textContent === "✗";
    });
    for (let i = 0; i < 8; i++) {
      const r = await chat("/v1/chat/completions", env.KP_CLIENT);
      assert.equal(r.status, 200);
      assert.equal(r.key, "b", "a disabled key served a request");
    }
  });

  await step("the audit log shows the console's changes", async () => {
    await page.click("a[data-page=audit]");
    await page.waitForFunction(() => {
      const text = document.querySelector("#audit-table tbody").textContent;
      return text.includes("key.update") && text.includes("gateway.create") && text.includes("console 127.0.0.1");
    });
  });

  await step("Chinese, dark, and a reload keeps the session", async () => {
    await page.click("#lang");
    await page.waitForFunction(() => document.querySelector('a[data-page="keys"]').textContent === "密钥");
    await page.click("#theme");
    await page.reload();
    await page.waitForSelector("#nav:not([hidden])");
    if (env.KP_SCREENSHOTS) await page.screenshot({ path: `${env.KP_SCREENSHOTS}/audit-zh-dark.png`, fullPage: true });
    assert.equal(await page.textContent('a[data-page="keys"]'), "密钥");
  });

  await step("no secret in any page or answer", async () => {
    const dom = await page.content();
    for (const s of SECRETS) {
      assert.ok(!dom.includes(s), `a secret in the page: ${s.slice(0, 6)}…`);
      for (const a of answers) assert.ok(!a.text.includes(s), `a secret in ${a.url}`);
    }
    // the generated gateway secret: in its creation answer only
    for (const a of answers) {
      if (a.text.includes(generated)) assert.ok(a.url.endsWith("/api/gateways") && a.text.includes('"secret"'), `the gateway secret in ${a.url}`);
    }
    assert.ok(!dom.includes(generated));
    assert.deepEqual(pageErrors, []);
  });

  await step("logs out", async () => {
    await page.click("#logout");
    await page.waitForSelector("#login:not([hidden])");
    const resp = await page.evaluate(async () => (await fetch("/api/keys")).status);
    assert.equal(resp, 401);
  });

  await browser.close();
}

main().catch(() => process.exit(1));
