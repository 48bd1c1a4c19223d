// Small DOM and formatting helpers shared by the pages.

/** The element with this id; a missing one is a bug in the page, so say which. */
export function byId(id) {
  const element = document.getElementById(id);
  if (!element) throw new Error(`#${id} is missing from the page`);
  return element;
}

/** Creates an element with a class and text (never HTML: all server text is untrusted). */
export function el(tag, { className, text, attrs } = {}, children = []) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  for (const [name, value] of Object.entries(attrs ?? {})) element.setAttribute(name, value);
  element.append(...children);
  return element;
}

/**
 * Shows a message in a notice element; `kind` (info, success, error) picks its
 * look, `action` ({label, onClick}) adds a button such as "retry". An empty
 * message hides the element.
 */
export function notify(element, message, kind = 'info', action) {
  element.textContent = message ?? '';
  element.hidden = !message;
  element.dataset.kind = kind;
  if (message && action) {
    const button = el('button', { className: 'button small secondary', text: action.label, attrs: { type: 'button' } });
    button.addEventListener('click', action.onClick, { once: true });
    element.append(' ', button);
  }
}

export const RETRY = '重试 · Retry';

/** ¥9.90 from 990 fen (integer maths, no float rounding surprises). */
export function yuan(fen) {
  const sign = fen < 0 ? '-' : '';
  const abs = Math.abs(fen);
  return `${sign}¥${Math.floor(abs / 100)}.${String(abs % 100).padStart(2, '0')}`;
}

const dateFormat = new Intl.DateTimeFormat('zh-CN', {
  year: 'numeric',
  month: '2-digit',
  day: '2-digit',
  hour: '2-digit',
  minute: '2-digit',
  hour12: false,
});

/** A unix timestamp as local date and time. */
export function dateTime(unixSecs) {
  return dateFormat.format(new Date(unixSecs * 1000));
}

/** m:ss for a countdown. */
export function minutesSeconds(secs) {
  const s = Math.max(0, Math.ceil(secs));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
