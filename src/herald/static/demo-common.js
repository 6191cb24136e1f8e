// Helpers shared by the demo pages.  User data only ever reaches the page through
// textContent (never innerHTML), so a message like "<img onerror=...>" shows as text.

/** Create an element with text content and optional class/attributes. */
export function el(tag, { text, cls, attrs } = {}) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (attrs) for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

/**
 * Keep a status pill and a "reconnecting" banner in step with the client's events.
 * The pill's `data-state` (styled in demo.css): offline (not connected, the page's choice),
 * connecting, connected, reconnecting, closed (the server refused or ended it for good).
 */
export function bindStatus(client, statusEl, bannerEl) {
  const set = (state, label) => {
    statusEl.dataset.state = state;
    statusEl.textContent = label;
    document.body.dataset.connection = state;
  };
  set("connecting", "connecting");
  client.on("connected", () => {
    set("connected", "connected");
    if (bannerEl) bannerEl.hidden = true;
  });
  client.on("reconnecting", ({ delay }) => {
    set("reconnecting", "reconnecting");
    if (bannerEl) {
      bannerEl.textContent = `Connection lost: reconnecting… (next try in ${(delay / 1000).toFixed(1)} s)`;
      bannerEl.hidden = false;
    }
  });
  client.on("disconnected", ({ reconnect, code, byClient }) => {
    if (byClient) {
      set("offline", "offline"); // the page closed it (e.g. "Change room"): nothing is wrong
      if (bannerEl) bannerEl.hidden = true;
    } else if (!reconnect) {
      set("closed", "disconnected");
      if (bannerEl) {
        bannerEl.textContent = `Disconnected by the server (code ${code}). Reload the page to reconnect.`;
        bannerEl.hidden = false;
      }
    }
  });
}

/** A query-string parameter, or `fallback`. */
export function param(name, fallback = "") {
  return new URLSearchParams(location.search).get(name) ?? fallback;
}

/** Room names become channel names: keep the characters channels allow. */
export function cleanRoom(value, fallback = "lobby") {
  const room = String(value || "").trim().toLowerCase().replace(/[^a-z0-9_.-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40);
  return room || fallback;
}

/** A random id that survives reloads of this tab (sessionStorage), for "who am I" in demos. */
export function tabId() {
  let id = sessionStorage.getItem("herald-demo-tab");
  if (!id) {
    id = Math.random().toString(36).slice(2, 10);
    sessionStorage.setItem("herald-demo-tab", id);
  }
  return id;
}
