// Member page: profile, quota, products, orders, the quota's history, paying and signing out.

import { api, authImage, goToSignIn, loadConfig, payMode, serverNow, session } from './api.js';
import { payInWeChat, payWithSimulator, pendingOrder, waitForOrder } from './pay.js';
import { byId, dateTime, el, minutesSeconds, notify, RETRY, sleep, yuan } from './ui.js';

// created: order recorded, no WeChat Pay prepay yet; pending: prepay made, waiting for the money.
const STATUS_LABELS = {
  created: '已创建 · Created',
  pending: '待支付 · Awaiting payment',
  paid: '已支付 · Paid',
  failed: '支付失败 · Failed',
  closed: '已关闭 · Closed',
};
const PLACEHOLDER_AVATAR = 'assets/avatar.svg';

const pageMessage = byId('page-message');
const checkout = byId('checkout');
const checkoutSummary = byId('checkout-summary');
const checkoutStatus = byId('checkout-status');
const wechatPayButton = byId('wechat-pay');
const simulateButton = byId('simulate-pay');
const nativePay = byId('native-pay');
const nativeQr = byId('native-qr');
const newCodeButton = byId('new-code');
const NATIVE_POLL_MS = 1500;
const productList = byId('products');

// The order shown in the checkout panel (create-order's answer, or a stub
// with only out_trade_no when resuming after a reload).
let currentOrder = null;
let busy = false; // one payment at a time: no double orders from double taps
// The product of the Native code on screen (a new code orders it again), and
// a counter that stops the polling of a code that is no longer shown.
let nativeProduct = null;
let nativeShown = 0;

if (!session.token) {
  goToSignIn();
} else {
  byId('logout').addEventListener('click', logout);
  byId('checkout-close').addEventListener('click', closeCheckout);
  wechatPayButton.addEventListener('click', () => currentOrder && payOrderInWeChat(currentOrder));
  simulateButton.addEventListener('click', () => currentOrder && simulatePayment(currentOrder));
  newCodeButton.addEventListener('click', () => nativeProduct && buy(nativeProduct));
  loadProfile();
  loadProducts();
  loadOrders();
  loadLedger();
  resumePendingOrder();
}

// --- loading and rendering ---

async function loadProfile() {
  let me;
  try {
    me = await api('/api/v1/user/me', { auth: true });
  } catch (error) {
    notify(pageMessage, error.message, 'error', { label: RETRY, onClick: loadProfile });
    return;
  }
  notify(pageMessage, '');
  const nickname = byId('nickname');
  nickname.textContent = me.nickname || '微信用户 · WeChat user';
  nickname.classList.toggle('placeholder', !me.nickname);

  const avatar = byId('avatar');
  if (!me.avatar_url) {
    delete avatar.dataset.url;
    avatar.src = PLACEHOLDER_AVATAR;
  } else if (avatar.dataset.url !== me.avatar_url) {
    avatar.dataset.url = me.avatar_url; // set once: a failed avatar is not fetched again on refresh
    // A broken or blocked avatar falls back to the placeholder instead of a broken image.
    avatar.addEventListener('error', () => (avatar.src = PLACEHOLDER_AVATAR), { once: true });
    avatar.src = me.avatar_url;
  }

  const subscribed = byId('subscribed');
  subscribed.textContent = me.subscribed ? '已关注公众号 · Following' : '未关注公众号 · Not following';
  subscribed.dataset.on = String(Boolean(me.subscribed));
  subscribed.hidden = false;

  byId('quota').textContent = String(me.quota);
  byId('profile').setAttribute('aria-busy', 'false');
}

async function loadProducts() {
  const message = byId('products-message');
  let products;
  try {
    ({ products } = await api('/api/v1/payment/products'));
  } catch (error) {
    notify(message, error.message, 'error', { label: RETRY, onClick: loadProducts });
    productList.setAttribute('aria-busy', 'false');
    return;
  }
  notify(message, products.length ? '' : '暂无可购买的商品 · Nothing for sale right now');
  productList.replaceChildren(...products.map(productItem));
  productList.setAttribute('aria-busy', 'false');
}

function productItem(product) {
  const button = el('button', {
    className: 'button',
    text: '购买 · Buy',
    attrs: { type: 'button', 'aria-label': `购买 ${product.name} · Buy ${product.name}` },
  });
  button.disabled = busy;
  button.addEventListener('click', () => buy(product));
  return el('li', { className: 'product', attrs: { 'data-product-id': product.id } }, [
    el('div', { className: 'product-text' }, [
      el('p', { className: 'product-name', text: product.name }),
      el('p', { className: 'product-credits', text: `+${product.credits} 次 · uses` }),
    ]),
    el('p', { className: 'price', text: yuan(product.price_fen) }),
    button,
  ]);
}

async function loadOrders() {
  const list = byId('orders');
  const message = byId('orders-message');
  let orders;
  try {
    ({ orders } = await api('/api/v1/user/orders', { auth: true }));
  } catch (error) {
    notify(message, error.message, 'error', { label: RETRY, onClick: loadOrders });
    list.setAttribute('aria-busy', 'false');
    return;
  }
  notify(message, '');
  byId('orders-empty').hidden = orders.length > 0;
  list.replaceChildren(...orders.map(orderItem));
  list.setAttribute('aria-busy', 'false');
}

function orderItem(order) {
  return el('li', { className: 'order', attrs: { 'data-out-trade-no': order.out_trade_no, 'data-status': order.status } }, [
    el('div', { className: 'order-main' }, [
      el('p', { className: 'order-description', text: order.description }),
      el('p', {
        className: 'order-meta',
        text: `${dateTime(order.created_at)} · +${order.credits} 次 · ${order.out_trade_no}`,
      }),
    ]),
    el('p', { className: 'price', text: yuan(order.amount_fen) }),
    el('p', { className: 'status', text: STATUS_LABELS[order.status] ?? order.status, attrs: { 'data-status': order.status } }),
    ...(order.refunded_fen > 0
      ? [el('p', {
          className: 'refunded',
          text: order.refunded_fen >= order.amount_fen
            ? `已全额退款 · Refunded ${yuan(order.refunded_fen)}`
            : `已退款 · Refunded ${yuan(order.refunded_fen)}`,
        })]
      : []),
  ]);
}

/** What each change of the quota was, as the ledger's `cause` says. */
const CAUSE_LABELS = {
  opening: '初始额度 · Opening balance',
  order: '购买 · Bought',
  consume: '使用 · Used',
  release: '退回 · Given back',
  refund: '退款扣回 · Refunded',
  admin: '调整 · Adjusted',
};

/** The newest changes of the quota: purchases, usage, refunds. */
async function loadLedger() {
  const list = byId('ledger');
  const message = byId('ledger-message');
  let entries;
  try {
    ({ entries } = await api('/api/v1/user/quota/ledger?limit=10', { auth: true }));
  } catch (error) {
    notify(message, error.message, 'error', { label: RETRY, onClick: loadLedger });
    list.setAttribute('aria-busy', 'false');
    return;
  }
  notify(message, '');
  byId('ledger-empty').hidden = entries.length > 0;
  list.replaceChildren(...entries.map(ledgerItem));
  list.setAttribute('aria-busy', 'false');
}

function ledgerItem(entry) {
  const delta = entry.delta > 0 ? `+${entry.delta}` : String(entry.delta);
  return el('li', { className: 'order', attrs: { 'data-cause': entry.cause } }, [
    el('div', { className: 'order-main' }, [
      el('p', { className: 'order-description', text: CAUSE_LABELS[entry.cause] ?? entry.cause }),
      el('p', {
        className: 'order-meta',
        text: [dateTime(entry.created_at), entry.description].filter(Boolean).join(' · '),
      }),
    ]),
    el('p', { className: 'price', text: `${delta} 次` }),
    el('p', { className: 'status', text: `余额 ${entry.balance_after} 次 · Balance`, attrs: { 'data-status': 'balance' } }),
  ]);
}

// --- paying ---

async function buy(product) {
  if (busy) return;
  setBusy(true);
  openCheckout(`${product.name} · ${yuan(product.price_fen)} · +${product.credits} 次 · uses`);
  notify(checkoutStatus, '正在创建订单… · Creating the order…');
  const mode = payMode();
  let order;
  try {
    order = await api('/api/v1/payment/create-order', {
      method: 'POST',
      auth: true,
      body: { product_id: product.id, trade_type: mode },
    });
  } catch (error) {
    notify(checkoutStatus, error.message, 'error');
    setBusy(false);
    return;
  }
  currentOrder = order;
  checkout.dataset.outTradeNo = order.out_trade_no;
  checkout.dataset.tradeType = order.trade_type;
  checkoutSummary.textContent = `${order.description} · ${yuan(order.amount_fen)} · +${order.credits} 次 · uses`;
  loadOrders(); // the new order appears as awaiting payment
  setBusy(false);

  if (mode === 'jsapi') {
    payOrderInWeChat(order);
    return;
  }
  if (mode === 'h5') {
    // WeChat's cashier, and back here to see the result (remembered across the trip).
    pendingOrder.set(order.out_trade_no);
    const back = `${location.origin}${location.pathname}`;
    location.assign(`${order.h5_url}&redirect_url=${encodeURIComponent(back)}`);
    return;
  }
  await showNativeCode(order, product);
  const config = await loadConfig().catch(() => ({ simulator_url: null }));
  if (config.simulator_url && !checkout.hidden && checkout.dataset.outTradeNo === order.out_trade_no) {
    simulateButton.hidden = false;
  }
}

/** A PC: the order's QR code, its amount and expiry, until it is paid or expires. */
async function showNativeCode(order, product) {
  const shown = ++nativeShown;
  nativeProduct = product;
  newCodeButton.hidden = true;
  nativeQr.classList.remove('expired');
  byId('native-amount').textContent = yuan(order.amount_fen);
  try {
    const previous = nativeQr.src;
    nativeQr.src = await authImage(`/api/v1/user/orders/${encodeURIComponent(order.out_trade_no)}/qrcode`);
    if (previous.startsWith('blob:')) URL.revokeObjectURL(previous);
  } catch (error) {
    notify(checkoutStatus, error.message, 'error');
    return;
  }
  nativePay.hidden = false;
  notify(checkoutStatus, '请用微信扫描二维码完成支付 · Scan the QR code with WeChat to pay');
  pollNativeOrder(order, shown);
}

async function pollNativeOrder(order, shown) {
  const expiry = byId('native-expiry');
  for (;;) {
    if (shown !== nativeShown || checkout.hidden) return; // another code, or the panel closed
    const left = Math.round(order.time_expire - serverNow());
    if (left <= 0) {
      nativeQr.classList.add('expired');
      expiry.textContent = '二维码已过期 · The code has expired';
      notify(checkoutStatus, '二维码已过期，请重新生成 · The code has expired: make a new one', 'error');
      simulateButton.hidden = true;
      newCodeButton.hidden = false;
      newCodeButton.focus();
      return;
    }
    expiry.textContent = `${minutesSeconds(left)} 后过期 · expires in ${minutesSeconds(left)}`;
    try {
      const seen = await api(`/api/v1/user/orders/${encodeURIComponent(order.out_trade_no)}`, { auth: true });
      if (['paid', 'failed', 'closed'].includes(seen.status)) {
        if (shown !== nativeShown) return;
        nativePay.hidden = true;
        simulateButton.hidden = true;
        await confirmPayment(order.out_trade_no);
        return;
      }
    } catch (error) {
      notify(checkoutStatus, `${error.message} · 正在重试 · Retrying…`, 'error');
    }
    await sleep(NATIVE_POLL_MS);
  }
}

async function payOrderInWeChat(order) {
  if (busy) return;
  setBusy(true);
  wechatPayButton.hidden = true;
  // Remembered before the sheet opens: WeChat may reload the page meanwhile.
  pendingOrder.set(order.out_trade_no);
  notify(checkoutStatus, '正在打开微信支付… · Opening WeChat Pay…');
  const result = await payInWeChat(order.pay_params);
  if (result === 'ok') {
    await confirmPayment(order.out_trade_no);
    setBusy(false);
    return;
  }
  pendingOrder.clear();
  setBusy(false);
  wechatPayButton.hidden = false; // the same order can be paid again
  if (result === 'cancel') notify(checkoutStatus, '已取消支付 · Payment cancelled');
  else notify(checkoutStatus, `支付失败 · Payment failed: ${result}`, 'error');
}

async function simulatePayment(order) {
  if (busy) return;
  setBusy(true);
  simulateButton.hidden = true;
  pendingOrder.set(order.out_trade_no);
  notify(checkoutStatus, '正在模拟支付… · Simulating the payment…');
  try {
    const { simulator_url: simulatorUrl } = await loadConfig();
    await payWithSimulator(simulatorUrl, order.out_trade_no);
  } catch (error) {
    pendingOrder.clear();
    notify(checkoutStatus, error.message, 'error');
    simulateButton.hidden = false;
    setBusy(false);
    return;
  }
  // A Native code on screen sees the payment through its own polling.
  if (order.trade_type !== 'native') await confirmPayment(order.out_trade_no);
  setBusy(false);
}

/** Waits for the server to see the payment, then shows the new quota and order. */
async function confirmPayment(outTradeNo) {
  notify(checkoutStatus, '正在确认支付结果… · Confirming the payment…');
  let order;
  try {
    order = await waitForOrder(outTradeNo, {
      onRetry: (error) => notify(checkoutStatus, `${error.message} · 正在重试 · Retrying…`, 'error'),
    });
  } catch (error) {
    pendingOrder.clear();
    notify(checkoutStatus, error.message, 'error');
    return;
  }
  if (!order) {
    // Kept out of sessionStorage too: the orders list shows the final state on the next visit.
    pendingOrder.clear();
    notify(checkoutStatus, '暂未确认到支付结果，请稍后在订单记录中查看 · The payment is not confirmed yet; check your orders later', 'error');
    loadOrders();
    return;
  }
  pendingOrder.clear();
  // Refreshed first, so that the announcement and the quota on screen agree.
  await Promise.all([loadProfile(), loadOrders(), loadLedger()]);
  checkout.dataset.status = order.status;
  if (order.status === 'paid') {
    notify(checkoutStatus, `支付成功，额度 +${order.credits} · Paid: +${order.credits} uses`, 'success');
  } else {
    notify(checkoutStatus, `订单状态 · Order status: ${STATUS_LABELS[order.status] ?? order.status}`, 'error');
  }
}

/** A payment started before a reload (or WeChat's return to the page): see how it ended. */
function resumePendingOrder() {
  const outTradeNo = pendingOrder.get();
  if (!outTradeNo) return;
  currentOrder = { out_trade_no: outTradeNo };
  openCheckout(`订单 · Order ${outTradeNo}`);
  checkout.dataset.outTradeNo = outTradeNo;
  setBusy(true);
  confirmPayment(outTradeNo).finally(() => setBusy(false));
}

function openCheckout(summary) {
  checkout.hidden = false;
  delete checkout.dataset.status;
  delete checkout.dataset.outTradeNo;
  checkoutSummary.textContent = summary;
  wechatPayButton.hidden = true;
  simulateButton.hidden = true;
  newCodeButton.hidden = true;
  nativePay.hidden = true;
  nativeShown++;
  delete checkout.dataset.tradeType;
  checkout.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
  checkout.focus({ preventScroll: true });
}

function closeCheckout() {
  checkout.hidden = true;
  nativePay.hidden = true;
  nativeShown++; // stops the polling of a code no longer shown
  currentOrder = null;
}

function setBusy(value) {
  busy = value;
  for (const button of productList.querySelectorAll('button')) button.disabled = value;
  byId('checkout-close').disabled = value;
}

// --- signing out ---

async function logout() {
  const button = byId('logout');
  button.disabled = true;
  try {
    await api('/api/v1/auth/logout', { method: 'POST', auth: true, on401: 'throw' });
  } catch {
    // Already invalid, or the server is unreachable: either way this browser forgets the session.
  }
  pendingOrder.clear();
  goToSignIn('已退出登录 · You have signed out');
}
