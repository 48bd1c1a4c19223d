// Talks to the wxhost app role: the session token, JSON calls with readable
// errors, and what a 401 means for the page (back to sign-in, with a message).

const TOKEN_KEY = 'wxhost.token';
const FLASH_KEY = 'wxhost.flash';

export const NETWORK_ERROR = '网络错误 · Network error';

/** An API failure whose `message` is always fit to show to the user. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

export const session = {
  get token() {
    return localStorage.getItem(TOKEN_KEY);
  },
  save(token) {
    localStorage.setItem(TOKEN_KEY, token);
  },
  clear() {
    localStorage.removeItem(TOKEN_KEY);
  },
};

// A message for the next page (sign-in), carried in sessionStorage so it never
// shows up in a URL, a referrer or the history.
export const flash = {
  set(message) {
    sessionStorage.setItem(FLASH_KEY, message);
  },
  take() {
    const message = sessionStorage.getItem(FLASH_KEY);
    sessionStorage.removeItem(FLASH_KEY);
    return message;
  },
};

// The server's 401 messages are English only; the page speaks Chinese first.
const SESSION_MESSAGES = {
  session_expired: '登录已过期，请重新登录 · Your session has expired, please sign in again',
  session_revoked: '你已退出登录，请重新登录 · You signed out, please sign in again',
  session_invalid: '登录状态无效，请重新登录 · Your session is not valid, please sign in again',
  invalid_session: '登录状态无效，请重新登录 · Your session is not valid, please sign in again',
  unauthorized: '请先登录 · Please sign in',
};

/** The sign-in page is where every lost session ends up. */
export function goToSignIn(message) {
  session.clear();
  if (message) flash.set(message);
  location.replace('index.html');
}

// Clock difference to the server (seconds), learnt from the Date header, so a
// countdown to a server `expires_at` stays right on a machine with a wrong clock.
let serverSkew = 0;

/** Now on the server's clock, in unix seconds. */
export function serverNow() {
  return Date.now() / 1000 + serverSkew;
}

/**
 * Calls the API. `auth` sends the session token; by default a 401 then ends
 * the session and never resolves (the page is leaving), `on401: 'throw'` lets
 * the caller handle it instead.
 */
export async function api(path, { method = 'GET', body, auth = false, on401 = 'sign-in' } = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (auth) {
    if (!session.token) return lostSession('unauthorized', on401);
    headers.Authorization = `Bearer ${session.token}`;
  }
  const response = await request(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
  });
  const date = Date.parse(response.headers.get('Date') ?? '');
  if (!Number.isNaN(date)) serverSkew = (date - Date.now()) / 1000;
  const data = await response.json().catch(() => null);
  if (response.ok) {
    if (data === null) throw new ApiError(response.status, 'bad_response', `服务器响应无效 · Invalid server response (HTTP ${response.status})`);
    return data;
  }
  const code = data?.error?.code ?? 'http_error';
  if (response.status === 401 && auth) return lostSession(code, on401, data?.error?.message);
  throw new ApiError(response.status, code, data?.error?.message || `服务器错误 · Server error (HTTP ${response.status})`);
}

/** A signed-in image (a Native order's QR code) as an object URL for an <img>. */
export async function authImage(path) {
  if (!session.token) return lostSession('unauthorized', 'sign-in');
  const response = await request(path, { headers: { Authorization: `Bearer ${session.token}` }, cache: 'no-store' });
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    throw new ApiError(response.status, data?.error?.code ?? 'http_error', data?.error?.message || `服务器错误 · Server error (HTTP ${response.status})`);
  }
  return URL.createObjectURL(await response.blob());
}

/** A cross-origin JSON call (the dev simulator): same error handling, no token. */
export async function postJson(url, body) {
  const response = await request(url, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok || data === null) {
    throw new ApiError(response.status, 'http_error', data?.error?.message || `请求失败 · Request failed (HTTP ${response.status})`);
  }
  return data;
}

async function request(url, init) {
  try {
    return await fetch(url, init);
  } catch {
    // fetch only rejects when no answer came back at all.
    throw new ApiError(0, 'network', NETWORK_ERROR);
  }
}

function lostSession(code, on401, serverMessage) {
  const message = SESSION_MESSAGES[code] ?? serverMessage ?? SESSION_MESSAGES.unauthorized;
  if (on401 === 'throw') throw new ApiError(401, code, message);
  goToSignIn(message);
  return new Promise(() => {});
}

let configPromise;

/** `/config.json`: appid, the OAuth authorize URL and, in development, the simulator. */
export function loadConfig() {
  configPromise ??= api('/config.json').catch((error) => {
    configPromise = undefined; // let a retry fetch it again
    throw error;
  });
  return configPromise;
}

/** WeChat's in-app browser, where OAuth and JSAPI payment work. */
export function isWeChat() {
  return /MicroMessenger/i.test(navigator.userAgent);
}

/**
 * How this browser pays: inside WeChat with JSAPI, a phone browser through
 * WeChat's H5 cashier, anything else (a PC) by scanning a Native QR code.
 */
export function payMode() {
  if (isWeChat()) return 'jsapi';
  const phone = /Android|iPhone|iPad|iPod|Mobile|HarmonyOS/i.test(navigator.userAgent);
  return phone ? 'h5' : 'native';
}
