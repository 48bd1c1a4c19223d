// Paying an order: WeChat's JSAPI inside WeChat, the simulator in development,
// and polling the server for the result (the only source of truth: the client
// side "ok" of WeChat Pay does not mean the money arrived).

import { api, ApiError, postJson } from './api.js';
import { sleep } from './ui.js';

const PENDING_KEY = 'wxhost.pending_order';
const POLL_MS = 1500;
const POLL_TIMEOUT_MS = 60_000;

/** The order whose payment was started but not yet confirmed (survives a reload). */
export const pendingOrder = {
  get: () => sessionStorage.getItem(PENDING_KEY),
  set: (outTradeNo) => sessionStorage.setItem(PENDING_KEY, outTradeNo),
  clear: () => sessionStorage.removeItem(PENDING_KEY),
};

/**
 * Opens WeChat's payment sheet. Resolves with 'ok', 'cancel' or an error
 * message; WeixinJSBridge only exists inside WeChat and may appear after load.
 */
export function payInWeChat(payParams) {
  return new Promise((resolve) => {
    const invoke = () =>
      window.WeixinJSBridge.invoke('getBrandWCPayRequest', payParams, (res) => {
        const msg = res?.err_msg ?? '';
        if (msg === 'get_brand_wcpay_request:ok') resolve('ok');
        else if (msg === 'get_brand_wcpay_request:cancel') resolve('cancel');
        else resolve(res?.err_desc || msg || 'unknown');
      });
    if (window.WeixinJSBridge?.invoke) invoke();
    else document.addEventListener('WeixinJSBridgeReady', invoke, { once: true });
  });
}

/** Development only: the simulator pays the order and sends WeChat Pay's notify to the server. */
export async function payWithSimulator(simulatorUrl, outTradeNo) {
  const result = await postJson(`${simulatorUrl.replace(/\/$/, '')}/sim/pay`, { out_trade_no: outTradeNo });
  if (result.trade_state !== 'SUCCESS') {
    throw new ApiError(0, 'sim_failed', `模拟支付失败 · Simulated payment failed (${result.trade_state ?? 'unknown'})`);
  }
}

/**
 * Polls the order until it is settled (paid, failed, closed) and returns it,
 * or returns null after the timeout. `onRetry` hears about transient errors.
 */
export async function waitForOrder(outTradeNo, { onRetry } = {}) {
  const deadline = Date.now() + POLL_TIMEOUT_MS;
  for (;;) {
    try {
      const order = await api(`/api/v1/user/orders/${encodeURIComponent(outTradeNo)}`, { auth: true });
      if (['paid', 'failed', 'closed'].includes(order.status)) return order;
    } catch (error) {
      // Not the caller's order (or never made): nothing to wait for.
      if (error.status === 404) throw error;
      onRetry?.(error);
    }
    if (Date.now() + POLL_MS > deadline) return null;
    await sleep(POLL_MS);
  }
}
