#!/usr/bin/env node
// Browser test of the member pages against a running wxhost (app role serving
// pages and API) and its WeChat simulator:
//
//   APP_URL=http://127.0.0.1:8082 SIM_URL=http://127.0.0.1:9300 node host/tests/browser/e2e.mjs
//
// Drives the system Chromium (no browser download) through QR login, buying
// on a PC by scanning the Native QR code and on a phone through H5, the mobile layout, sign-out and lost sessions,
// an API error and OAuth login. Stops at the first failed step with a
// screenshot; after the last step fails if the pages logged a console error, a
// request failed or an HTTP error came back that no step expected.

import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import jsQR from 'jsqr';
import { chromium } from 'playwright-core';
import { PNG } from 'pngjs';

const APP_URL = (process.env.APP_URL ?? 'http://127.0.0.1:8082').replace(/\/+$/, '');
const SIM_URL = (process.env.SIM_URL ?? 'http://127.0.0.1:9300').replace(/\/+$/, '');
const ARTIFACT_DIR = process.env.ARTIFACT_DIR ?? path.join(path.dirname(fileURLToPath(import.meta.url)), 'artifacts');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const TIMEOUT_MS = 20_000;
const TOKEN_KEY = 'wxhost.token';
// Test users unique to this run, so that a rerun against the same database
// still starts from a new user with quota 0.
const RUN_ID = Date.now().toString(36);
const ALICE = `alice-${RUN_ID}`;

// The machine has no internet: WeChat's avatar CDN is answered locally with a
// tiny PNG (the page's CSP must still allow the host, or the browser says so).
const AVATAR_HOSTS = /^https?:\/\/([a-z0-9-]+\.)*qlogo\.cn\//;
const TINY_PNG = Buffer.from(
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNoaPgPAAOBAcDUmYvPAAAAAElFTkSuQmCC',
  'base64',
);

class Failure extends Error {}

function assert(condition, message) {
  if (!condition) throw new Failure(message);
}

// --- watching the browser for problems nobody asked for ---

const problems = [];
let currentStep = 'setup';
// Failing responses the current step provokes on purpose: [{ url: RegExp, status }].
let expectedFailures = [];

const isExpected = (url, status) =>
  expectedFailures.some((e) => e.url.test(url) && (status === undefined || e.status === status));

function watch(context) {
  context.on('console', (message) => {
    if (message.type() !== 'error') return;
    const where = message.location()?.url ?? '';
    // Chromium logs every 4xx/5xx resource as a console error; those the step
    // provoked are expected, the rest are caught by the response check too.
    if (/^Failed to load resource/.test(message.text()) && isExpected(where)) return;
    problems.push(`[${currentStep}] console error: ${message.text()} (${where})`);
  });
  context.on('weberror', (error) => problems.push(`[${currentStep}] uncaught: ${error.error().message}`));
  context.on('requestfailed', (request) => {
    const reason = request.failure()?.errorText ?? 'unknown';
    // Requests cut off by a navigation (a poll in flight when the page moves on) are not failures.
    if (reason === 'net::ERR_ABORTED') return;
    problems.push(`[${currentStep}] request failed: ${request.method()} ${request.url()} (${reason})`);
  });
  context.on('response', (response) => {
    if (response.status() < 400 || isExpected(response.url(), response.status())) return;
    problems.push(`[${currentStep}] HTTP ${response.status()}: ${response.request().method()} ${response.url()}`);
  });
  return context.route(AVATAR_HOSTS, (route) => route.fulfill({ contentType: 'image/png', body: TINY_PNG }));
}

// --- helpers ---

async function http(method, url, { body, token } = {}) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new Failure(`${method} ${url}: ${error.cause?.message ?? error.message}`);
  }
  const text = await response.text();
  assert(response.ok, `${method} ${url} answered HTTP ${response.status}: ${text.slice(0, 300)}`);
  try {
    return JSON.parse(text);
  } catch {
    throw new Failure(`${method} ${url} did not answer JSON: ${text.slice(0, 300)}`);
  }
}

/** Polls `probe` (async, returns a value or undefined/false) until it gives something. */
async function until(what, probe, timeoutMs = TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last !== undefined && last !== false && last !== null) return last;
    } catch (error) {
      last = error.message;
    }
    if (Date.now() > deadline) throw new Failure(`timed out after ${timeoutMs} ms waiting for ${what} (last seen: ${JSON.stringify(last)})`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

/** Text of the first element matching `selector` if it is rendered, else null. */
function visibleText(page, selector) {
  return page.evaluate((sel) => {
    const element = document.querySelector(sel);
    if (!element || element.closest('[hidden]') || element.getClientRects().length === 0) return null;
    return element.textContent.replace(/\s+/g, ' ').trim();
  }, selector);
}

async function waitForText(page, selector, test, what) {
  return until(`${what} (${selector})`, async () => {
    const text = await visibleText(page, selector);
    return text !== null && test(text) ? text : undefined;
  });
}

async function waitForPage(page, name) {
  await page.waitForURL((url) => url.pathname.endsWith(`/${name}`) || (name === 'index.html' && url.pathname === '/'), {
    timeout: TIMEOUT_MS,
  });
}

const tokenOf = (page) => page.evaluate((key) => localStorage.getItem(key), TOKEN_KEY);

function sessionState(token) {
  return { cookies: [], origins: [{ origin: APP_URL, localStorage: [{ name: TOKEN_KEY, value: token }] }] };
}

async function screenshot(page, name) {
  await page.screenshot({ path: path.join(ARTIFACT_DIR, name), fullPage: true });
}

/** Signs a test user in without a browser: QR code, simulated scan, poll. */
async function signInByScan(user) {
  const qr = await http('POST', `${APP_URL}/api/v1/auth/wechat/qrcode`);
  await scan(qr.ticket, user);
  return until(`the scan of ${user} to be seen`, async () => {
    const answer = await http('GET', `${APP_URL}/api/v1/auth/wechat/qrcode/${encodeURIComponent(qr.scene)}`);
    return answer.status === 'scanned' ? answer.token : undefined;
  });
}

async function scan(ticket, user) {
  const answer = await http('POST', `${SIM_URL}/sim/scan`, { body: { ticket, user } });
  assert(!answer.error, `the simulator could not scan: ${answer.error}`);
  assert(answer.status === undefined || answer.status < 300, `the web role refused the scan push: ${JSON.stringify(answer)}`);
}

// --- the run ---

let browser;
let passed = 0;
const openPages = new Set();

async function step(name, body) {
  currentStep = name;
  expectedFailures = [];
  console.log(`▶ ${name}`);
  const started = Date.now();
  try {
    await body();
  } catch (error) {
    await fail(name, error);
  }
  expectedFailures = [];
  passed += 1;
  console.log(`✓ ${name} (${Date.now() - started} ms)`);
}

async function fail(name, error) {
  console.error(`✗ ${name}: ${error instanceof Failure ? error.message : error.stack ?? error}`);
  let n = 0;
  for (const page of openPages) {
    if (page.isClosed()) continue;
    const file = `failure-${++n}.png`;
    await screenshot(page, file).catch(() => {});
    console.error(`  page ${page.url()} → ${path.join(ARTIFACT_DIR, file)}`);
  }
  for (const problem of problems) console.error(`  also: ${problem}`);
  console.log(`e2e: ${passed} passed, 1 failed`);
  await browser?.close().catch(() => {});
  process.exit(1);
}

async function newPage(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  openPages.add(page);
  page.on('close', () => openPages.delete(page));
  return page;
}

await fs.mkdir(ARTIFACT_DIR, { recursive: true });

await step('server is up and Chromium starts', async () => {
  const config = await http('GET', `${APP_URL}/config.json`);
  assert(config.appid && config.oauth_authorize_url, `/config.json lacks appid or oauth_authorize_url: ${JSON.stringify(config)}`);
  assert(config.simulator_url, '/config.json has no simulator_url: the test needs the development simulator');
  const index = await fetch(`${APP_URL}/`).catch((error) => ({ ok: false, status: error.message }));
  assert(index.ok, `GET ${APP_URL}/ answered ${index.status}: the app role must serve the pages`);
  if (!index.headers.get('content-security-policy')) console.log('  note: the pages are served without a Content-Security-Policy header');
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
});

const desktop = await browser.newContext({ viewport: { width: 1280, height: 800 } });
await watch(desktop);
const page = await newPage(desktop);
let aliceToken;

await step('1. desktop QR login', async () => {
  await page.goto(`${APP_URL}/`);
  const image = page.locator('#qr-image');
  await image.waitFor({ state: 'visible' });
  await until('the QR image to load', () => image.evaluate((img) => img.complete && img.naturalWidth > 0));
  const src = await image.evaluate((img) => img.src);
  const ticket = (await image.getAttribute('data-ticket')) || new URL(src).searchParams.get('ticket');
  assert(ticket, `no ticket on the QR image (src ${src})`);

  const response = await fetch(src);
  assert(response.ok, `the QR image ${src} answered HTTP ${response.status}`);
  const png = PNG.sync.read(Buffer.from(await response.arrayBuffer()));
  const decoded = jsQR(new Uint8ClampedArray(png.data), png.width, png.height);
  assert(decoded?.data, `the QR image ${src} does not decode as a QR code`);
  console.log(`  QR code says ${decoded.data}`);

  await waitForText(page, '#qr-countdown', (t) => /\d+:\d\d/.test(t), 'the expiry countdown');
  await screenshot(page, 'login-desktop.png');

  await scan(ticket, ALICE);
  await waitForPage(page, 'member.html');
  await waitForText(page, '#quota', (t) => t === '0', 'quota 0');
  aliceToken = await tokenOf(page);
  assert(aliceToken, 'no session token stored after the QR login');
  const me = await http('GET', `${APP_URL}/api/v1/user/me`, { token: aliceToken });
  const nickname = await waitForText(page, '#nickname', (t) => t && !t.includes('加载中'), 'the nickname');
  assert(!me.nickname || nickname === me.nickname, `nickname shown is "${nickname}", the server says "${me.nickname}"`);
  console.log(`  signed in as ${me.openid}, nickname shown: ${nickname}`);
});

await step('2. buy on a PC: the Native QR code, scanned and paid', async () => {
  const { products } = await http('GET', `${APP_URL}/api/v1/payment/products`);
  assert(products.length > 0, 'the catalog is empty');
  const product = products[0];
  const before = Number(await waitForText(page, '#quota', (t) => /^\d+$/.test(t), 'the quota'));

  await page.locator(`#products [data-product-id="${product.id}"] button`).click();
  const qr = page.locator('#native-qr');
  await qr.waitFor({ state: 'visible' });
  await until('the QR code to load', () => qr.evaluate((img) => img.complete && img.naturalWidth > 0));
  const outTradeNo = await page.locator('#checkout').getAttribute('data-out-trade-no');
  assert(outTradeNo, 'the checkout panel does not name its order');
  const tradeType = await page.locator('#checkout').getAttribute('data-trade-type');
  assert(tradeType === 'native', `a desktop browser ordered "${tradeType}", not native`);
  await waitForText(page, '#native-amount', (t) => t.includes((product.price_fen / 100).toFixed(2)), 'the amount');
  await waitForText(page, '#native-expiry', (t) => /\d+:\d\d/.test(t), 'the expiry countdown');
  await screenshot(page, 'native-qr-desktop.png');

  // What a phone's camera reads off the screen: the pixels of the code as drawn.
  const { width, height, pixels } = await qr.evaluate((img) => {
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const context = canvas.getContext('2d');
    context.fillStyle = '#fff';
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(img, 0, 0);
    return { width: canvas.width, height: canvas.height, pixels: Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data) };
  });
  const decoded = jsQR(new Uint8ClampedArray(pixels), width, height);
  assert(decoded?.data?.startsWith('weixin://wxpay/bizpayurl?pr='), `the QR code does not decode as a code_url: ${decoded?.data}`);
  console.log(`  QR code says ${decoded.data}`);
  const paid = await http('POST', `${SIM_URL}/sim/pay`, { body: { code_url: decoded.data, user: `dad-${RUN_ID}` } });
  assert(paid.out_trade_no === outTradeNo, `the code paid order ${paid.out_trade_no}, not ${outTradeNo}`);

  await until(`order ${outTradeNo} shown as paid`, () =>
    page.evaluate((no) => document.querySelector(`#orders [data-out-trade-no="${no}"]`)?.dataset.status === 'paid', outTradeNo),
  );
  await waitForText(page, `#orders [data-out-trade-no="${outTradeNo}"] .status`, (t) => t.includes('已支付'), 'the paid label');
  await waitForText(page, '#quota', (t) => Number(t) === before + product.credits, `quota ${before} + ${product.credits}`);
  // The quota's history shows the purchase, with the balance after it.
  await waitForText(page, '#ledger [data-cause="order"] .price', (t) => t.startsWith(`+${product.credits}`), 'the purchase in the quota history');
  await waitForText(page, '#checkout-status', (t) => t.includes('支付成功'), 'the success message');
  assert(await page.locator('#native-pay').isHidden(), 'the QR code is still shown after the payment');
  await screenshot(page, 'member-desktop.png');
});

await step('3. mobile layout', async () => {
  const mobile = await browser.newContext({
    viewport: { width: 390, height: 844 },
    isMobile: true,
    hasTouch: true,
    deviceScaleFactor: 2,
    storageState: sessionState(aliceToken),
  });
  await watch(mobile);
  const phone = await newPage(mobile);
  await phone.goto(`${APP_URL}/member.html`);
  await waitForText(phone, '#quota', (t) => /^\d+$/.test(t) && t !== '0', 'the quota after the purchase');
  await until('the orders list', () => phone.evaluate(() => document.querySelectorAll('#orders li').length > 0));
  const { scrollWidth, innerWidth } = await phone.evaluate(() => ({
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth: window.innerWidth,
  }));
  assert(scrollWidth <= innerWidth, `the page scrolls sideways on a phone: scrollWidth ${scrollWidth} > innerWidth ${innerWidth}`);
  await screenshot(phone, 'member-mobile.png');
  await mobile.close();
});

await step('3b. buy on a phone outside WeChat: H5, WeChat\'s cashier and back', async () => {
  const phoneContext = await browser.newContext({
    viewport: { width: 390, height: 844 },
    isMobile: true,
    hasTouch: true,
    userAgent: 'Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1',
    storageState: sessionState(aliceToken),
  });
  await watch(phoneContext);
  const phone = await newPage(phoneContext);
  await phone.goto(`${APP_URL}/member.html`);
  const before = Number(await waitForText(phone, '#quota', (t) => /^\d+$/.test(t), 'the quota'));
  const { products } = await http('GET', `${APP_URL}/api/v1/payment/products`);
  await phone.locator(`#products [data-product-id="${products[0].id}"] button`).click();
  // Sent to WeChat's H5 cashier (the simulator's), which pays and sends the browser back.
  await until('the H5 cashier', () => phone.url().startsWith(`${SIM_URL}/sim/pay/h5`));
  await screenshot(phone, 'h5-cashier.png');
  await phone.locator('#pay').click();
  await waitForPage(phone, 'member.html');
  await waitForText(phone, '#checkout-status', (t) => t.includes('支付成功'), 'the success message after H5');
  await waitForText(phone, '#quota', (t) => Number(t) === before + products[0].credits, `quota ${before} + ${products[0].credits}`);
  await screenshot(phone, 'member-after-h5.png');
  await phoneContext.close();
});

await step('4. sign out, then revoked and invalid sessions', async () => {
  await page.locator('#logout').click();
  await waitForPage(page, 'index.html');
  await waitForText(page, '#flash', (t) => t.length > 0, 'the signed-out message');
  assert(!(await tokenOf(page)), 'the token is still stored after signing out');

  // The page's own 401s from here on are the point of the step.
  expectedFailures = [{ url: /\/api\/v1\/(user|auth\/logout)/, status: 401 }];
  for (const [what, token] of [
    ['revoked', aliceToken],
    ['invalid', 'bogus-token'],
  ]) {
    await page.evaluate(([key, value]) => localStorage.setItem(key, value), [TOKEN_KEY, token]);
    await page.goto(`${APP_URL}/member.html`);
    await waitForPage(page, 'index.html');
    const message = await waitForText(page, '#flash', (t) => /登录|sign in/i.test(t), `the ${what}-session message`);
    console.log(`  ${what} session: "${message}"`);
    assert(!(await tokenOf(page)), `the ${what} token was not cleared`);
  }
  await screenshot(page, 'login-after-signout.png');
});

await step('5. an API error is shown readably', async () => {
  const token = await signInByScan(`bob-${RUN_ID}`);
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, storageState: sessionState(token) });
  await watch(context);
  const member = await newPage(context);
  expectedFailures = [{ url: /\/api\/v1\/payment\/products$/, status: 503 }];
  const unavailable = JSON.stringify({ error: { code: 'unavailable', message: '服务暂不可用' } });
  await member.route('**/api/v1/payment/products', (route) =>
    route.fulfill({ status: 503, contentType: 'application/json', body: unavailable }),
  );
  await member.goto(`${APP_URL}/member.html`);
  await waitForText(member, '#products-message', (t) => t.includes('服务暂不可用'), 'the server message');
  await waitForText(member, '#quota', (t) => t === '0', 'the rest of the page');
  await screenshot(member, 'member-api-error.png');

  // The retry button recovers once the API is back.
  await member.unroute('**/api/v1/payment/products');
  await member.locator('#products-message button').click();
  await until('the products after a retry', () => member.evaluate(() => document.querySelectorAll('#products li').length > 0));
  assert(await member.locator('#products-message').isHidden(), 'the error message stayed after a successful retry');
  await context.close();
});

await step('6. OAuth login through the simulator', async () => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await watch(context);
  const visitor = await newPage(context);
  await visitor.goto(`${APP_URL}/index.html`);
  await visitor.locator('#oauth-link').click();
  await waitForPage(visitor, 'member.html');
  await waitForText(visitor, '#quota', (t) => /^\d+$/.test(t), 'the quota');
  const token = await tokenOf(visitor);
  assert(token, 'no session token stored after OAuth');
  const me = await http('GET', `${APP_URL}/api/v1/user/me`, { token });
  assert(me.nickname, `the server has no nickname for the OAuth user (snsapi_userinfo): ${JSON.stringify(me)}`);
  const nickname = await waitForText(visitor, '#nickname', (t) => t === me.nickname, `nickname "${me.nickname}"`);
  assert(nickname.includes('dev-user'), `expected the simulator's dev user, the page shows "${nickname}"`);
  if (me.avatar_url) {
    await until('the avatar to load', () =>
      visitor.evaluate((url) => {
        const img = document.querySelector('#avatar');
        return img.src === url && img.complete && img.naturalWidth > 0;
      }, me.avatar_url),
    );
  }
  await screenshot(visitor, 'member-oauth.png');
  await context.close();
});

await step('no unexpected console errors or failed requests', async () => {
  await desktop.close();
  assert(problems.length === 0, `${problems.length} problem(s):\n  ${problems.join('\n  ')}`);
});

await browser.close();
console.log(`screenshots in ${ARTIFACT_DIR}`);
console.log(`e2e: ${passed} passed, 0 failed`);
