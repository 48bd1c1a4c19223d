// Sign-in page: WeChat OAuth inside WeChat (or on request), QR-code login on
// other browsers. Either way the session token ends up in localStorage and the
// user on member.html.

import { api, flash, isWeChat, loadConfig, serverNow, session } from './api.js';
import { byId, minutesSeconds, notify, RETRY, sleep } from './ui.js';

const STATE_KEY = 'wxhost.oauth_state';
const POLL_MS = 1500;

const flashBox = byId('flash');
const errorBox = byId('error');
const qrSection = byId('qr-login');
const qrFrame = byId('qr-frame');
const qrImage = byId('qr-image');
const qrOverlay = byId('qr-overlay');
const qrCountdown = byId('qr-countdown');
const qrStatus = byId('qr-status');
const qrRefresh = byId('qr-refresh');
const oauthLink = byId('oauth-link');

main();

async function main() {
  const message = flash.take();
  notify(flashBox, message);

  const params = new URLSearchParams(location.search);
  let oauthFailed = false;
  if (params.has('code') || params.has('state')) {
    if (await finishOAuth(params)) return;
    oauthFailed = true;
  } else if (session.token) {
    // Already signed in; member.html sends us back if the token is no longer good.
    location.replace('member.html');
    return;
  }

  let config;
  try {
    config = await loadConfig();
  } catch (error) {
    notify(errorBox, error.message, 'error', { label: RETRY, onClick: () => location.reload() });
    return;
  }

  oauthLink.addEventListener('click', () => startOAuth(config));
  oauthLink.disabled = false;
  if (isWeChat()) {
    // A QR code is of no use on the phone that would scan it.
    oauthLink.className = 'button';
    // Going straight to WeChat's authorization is what users expect, except
    // right after a sign-out or a failure, where it would sign them back in
    // (or loop) without them asking.
    if (!message && !oauthFailed) startOAuth(config);
  } else {
    qrSection.hidden = false;
    qrRefresh.addEventListener('click', () => startQrLogin());
    startQrLogin();
  }
}

// --- WeChat OAuth (web authorization) ---

function startOAuth(config) {
  const scope = document.querySelector('input[name="scope"]:checked')?.value ?? 'snsapi_userinfo';
  const state = randomHex(16);
  // Checked when WeChat sends the user back: a code we did not ask for is refused.
  sessionStorage.setItem(STATE_KEY, state);
  location.assign(
    `${config.oauth_authorize_url}?appid=${encodeURIComponent(config.appid)}` +
      `&redirect_uri=${encodeURIComponent(pageUrlWithoutOAuth())}` +
      `&response_type=code&scope=${scope}&state=${state}#wechat_redirect`,
  );
}

/** Exchanges the code WeChat sent back; true when the page is moving on to member.html. */
async function finishOAuth(params) {
  const code = params.get('code');
  const state = params.get('state');
  const expected = sessionStorage.getItem(STATE_KEY);
  sessionStorage.removeItem(STATE_KEY);
  // A code works once: a reload or a shared link must not send it again.
  history.replaceState(null, '', pageUrlWithoutOAuth());

  if (!code) {
    notify(errorBox, '你没有同意微信授权 · WeChat authorization was declined', 'error');
    return false;
  }
  if (!expected || state !== expected) {
    notify(errorBox, '登录链接已失效，请重新登录 · This sign-in link is no longer valid, please try again', 'error');
    return false;
  }
  notify(flashBox, '正在登录… · Signing in…');
  try {
    const result = await api(`/api/v1/auth/wechat?code=${encodeURIComponent(code)}`);
    session.save(result.token);
    location.replace('member.html');
    return true;
  } catch (error) {
    notify(flashBox, '');
    notify(errorBox, error.message, 'error');
    return false;
  }
}

function pageUrlWithoutOAuth() {
  const url = new URL(location.href);
  url.searchParams.delete('code');
  url.searchParams.delete('state');
  url.hash = '';
  return url.href;
}

function randomHex(bytes) {
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, '0')).join('');
}

// --- QR-code login ---

// Each QR code gets a generation number; a refresh makes the loops of the
// previous one stop at their next step.
let generation = 0;
let countdownTimer;

async function startQrLogin() {
  const mine = ++generation;
  clearInterval(countdownTimer);
  setQrState('loading', '正在生成二维码… · Creating the QR code…');
  qrCountdown.textContent = '';
  qrRefresh.disabled = true;

  let qr;
  try {
    qr = await api('/api/v1/auth/wechat/qrcode', { method: 'POST' });
  } catch (error) {
    if (mine === generation) setQrState('error', error.message);
    return;
  } finally {
    if (mine === generation) qrRefresh.disabled = false;
  }
  if (mine !== generation) return;

  qrImage.hidden = true;
  qrImage.dataset.ticket = qr.ticket; // lets tests (and support) see which code is shown
  qrImage.dataset.scene = qr.scene;
  qrImage.onload = () => mine === generation && setQrState('pending', '请用微信扫码 · Scan with WeChat');
  qrImage.onerror = () => mine === generation && setQrState('error', '二维码加载失败 · Could not load the QR code');
  qrImage.src = qr.qrcode_url;

  const tick = () => {
    const left = qr.expires_at - serverNow();
    qrCountdown.textContent = `${minutesSeconds(left)} 后过期 · Expires in ${minutesSeconds(left)}`;
  };
  tick();
  countdownTimer = setInterval(tick, 1000);

  pollScene(qr, mine);
}

async function pollScene(qr, mine) {
  while (mine === generation) {
    await sleep(POLL_MS);
    if (mine !== generation) return;
    // The server says `expired` itself; this only stops a poll the server never ends.
    if (serverNow() > qr.expires_at + 5) return expire();
    let answer;
    try {
      answer = await api(`/api/v1/auth/wechat/qrcode/${encodeURIComponent(qr.scene)}`);
    } catch (error) {
      if (mine !== generation) return;
      if (error.status === 404) return expire('二维码已失效', 'This QR code is no longer valid');
      // Transient (network, 5xx): say so and keep polling while the code lives.
      qrStatus.textContent = error.message;
      continue;
    }
    if (mine !== generation) return;
    switch (answer.status) {
      case 'scanned':
        session.save(answer.token);
        clearInterval(countdownTimer);
        setQrState('scanned', '扫码成功，正在进入… · Scanned, signing you in…');
        location.replace('member.html');
        return;
      case 'expired':
        return expire();
      case 'consumed':
        // Its token went to another tab or window; this one needs a new code.
        return expire('二维码已被使用', 'This QR code has already been used');
      default:
        if (qrFrame.dataset.state === 'pending') qrStatus.textContent = '请用微信扫码 · Scan with WeChat';
    }
  }
}

function expire(zh = '二维码已过期', en = 'The QR code has expired') {
  clearInterval(countdownTimer);
  qrCountdown.textContent = '';
  setQrState('expired', `${zh}，请刷新 · ${en}, please refresh`);
  qrOverlay.textContent = '已过期 · Expired';
  qrRefresh.focus();
}

function setQrState(state, message) {
  qrFrame.dataset.state = state;
  // A code that has gone stale stays visible (dimmed), a broken image never does.
  qrImage.hidden = !['pending', 'scanned', 'expired'].includes(state) || qrImage.naturalWidth === 0;
  qrOverlay.hidden = state !== 'expired';
  qrStatus.textContent = message;
  if (state === 'error' || state === 'expired') clearInterval(countdownTimer);
}
