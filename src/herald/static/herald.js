// herald.js: the browser client for Herald's protocol v1.
//
// One ES module, no build step, no dependencies:
//
//   import { HeraldClient } from "/static/herald.js";
//   const client = new HeraldClient();            // ws(s)://<this host>/connect
//   client.on("reconnecting", ({ delay }) => showBanner());
//   await client.connect();
//   await client.subscribe("chat:lobby", { history: 50, onPublication: (pub) => render(pub) });
//   await client.publish("chat:lobby", { text: "hi" });
//   // A private channel: a subscription token, or a function that fetches one (called
//   // again on every resubscribe and when the server says the token expired).
//   await client.subscribe("team:red", { token: () => fetchSubscriptionToken("team:red") });
//
// Delivery contract: for each subscription, `onPublication` (and the "publication"
// event) sees each offset at most once and in increasing order.  After a reconnect
// the client resubscribes with `since` = the last offset it delivered; the server
// sends what was missed, and a "recovered" event says whether that was everything
// (`recovered: false` means a gap: re-sync from history or your backend).
//
// Close codes 4500-4999 (and a server disconnect push with reconnect: false) stop
// reconnecting; every other loss of the socket reconnects with exponential backoff
// and full jitter.  A subscription the server ends (an `unsubscribe` push, e.g. code
// 112 when its token expired) or refuses to restore ends client-side too: an
// "unsubscribed" event says so, and it is not resubscribed.  See docs/clients.md.

export const SUBPROTOCOL = "herald.v1";

/** An error reply from the server, a timeout, or a lost connection. */
export class HeraldError extends Error {
  /**
   * @param {number} code  the protocol error code (100-121), or 0 for client-side errors
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = "HeraldError";
    this.code = code;
  }
}

/** Client-side error codes (below the protocol's 100-121 range). */
export const ClientErrorCode = Object.freeze({
  TIMEOUT: 1,
  DISCONNECTED: 2,
  CLOSED: 3,
});

/** Whether a client should reconnect after a close with `code` (mirrors herald/codes.py). */
export function shouldReconnect(code) {
  if (code >= 4000 && code < 4500) return true;
  if (code >= 4500 && code < 5000) return false;
  // 1006: the socket dropped without a close frame (network loss, server killed);
  // 1012: graceful server restart.  A normal close (1000) means "done".
  return [1001, 1006, 1011, 1012, 1013, 1014].includes(code);
}

function defaultUrl() {
  if (typeof location === "undefined") throw new Error("HeraldClient needs a URL outside a browser");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/connect`;
}

/** The transports a client can use, in the default order of preference. */
const TRANSPORTS = ["websocket", "http_stream", "sse"];

/**
 * The bidirectional emulation's URLs for a /connect URL: ws://host/p/connect ->
 * [http://host/p/emulation/connect (the stream), http://host/p/emulation (the POSTs)].
 */
function emulationUrls(url) {
  const parsed = new URL(url, typeof location === "undefined" ? undefined : location.href);
  if (parsed.protocol === "ws:") parsed.protocol = "http:";
  else if (parsed.protocol === "wss:") parsed.protocol = "https:";
  let path = parsed.pathname.replace(/\/+$/, "");
  if (path.endsWith("/connect")) path = path.slice(0, -"/connect".length);
  if (!path.endsWith("/emulation")) path += "/emulation";
  parsed.pathname = `${path}/connect`;
  const stream = parsed.href;
  parsed.pathname = path;
  return [stream, parsed.href];
}

/**
 * Herald's bidirectional emulation with a WebSocket's shape (send, close, onopen,
 * onmessage, onerror, onclose), so that the client runs the same code over it: frames
 * come down one streaming response (`fetch` reading NDJSON, or `EventSource` for
 * "sse"), commands go up in POSTs, one POST at a time so that they arrive in order
 * (several commands per POST when they queue up meanwhile).  docs/transports.md.
 */
class HttpStreamSocket {
  constructor(url, { sse = false, fetch = globalThis.fetch, EventSource = globalThis.EventSource } = {}) {
    [this._streamUrl, this._postUrl] = emulationUrls(url);
    this._fetch = fetch.bind(globalThis);
    this.readyState = 0;
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    this._session = null;
    this._outbox = [];
    this._posting = false;
    this._closeCode = null;
    this._closeReason = "";
    this._ended = false;
    this._abort = new AbortController();
    this._source = null;
    if (sse) this._openEventSource(EventSource);
    else this._openFetch();
  }

  _openEventSource(EventSourceClass) {
    if (!EventSourceClass) {
      this._fail("EventSource is not available");
      return;
    }
    const source = new EventSourceClass(this._streamUrl, { withCredentials: false });
    this._source = source;
    source.onmessage = (event) => this._line(event.data);
    // EventSource would reconnect by itself, into a new session the client knows nothing
    // of: the client reconnects (and resumes its subscriptions) instead.
    source.onerror = () => this._fail("stream error");
  }

  async _openFetch() {
    let response;
    try {
      response = await this._fetch(this._streamUrl, {
        method: "POST",
        headers: { Accept: "application/x-ndjson" },
        cache: "no-store",
        signal: this._abort.signal,
      });
    } catch (err) {
      this._fail(String(err));
      return;
    }
    if (!response.ok || !response.body) {
      this._fail(`HTTP ${response.status}`);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + 1);
          if (line.trim()) this._line(line);
          if (this._ended) return;
        }
      }
    } catch (_) {
      /* the stream broke: ended below */
    }
    this._finish(this._closeCode ?? 1006, this._closeReason);
  }

  _line(text) {
    if (this._ended) return;
    if (this._session === null) {
      // The first frame names the session and the secret its commands must carry.
      let hello;
      try {
        hello = JSON.parse(text);
      } catch (_) {
        hello = null;
      }
      if (!hello || hello.type !== "emulation") {
        this._fail("not a Herald emulation stream");
        return;
      }
      this._session = { session: hello.session, node: hello.node, secret: hello.secret };
      this.readyState = 1;
      if (this.onopen) this.onopen({});
      return;
    }
    if (text.startsWith('{"type":"disconnect"')) {
      // The stream ends after it: its code is the session's close code.
      try {
        const frame = JSON.parse(text);
        this._closeCode = frame.code;
        this._closeReason = frame.reason;
      } catch (_) {
        /* a malformed frame: the client's parser reports it */
      }
    }
    if (this.onmessage) this.onmessage({ data: text });
    if (this._closeCode !== null && this._source) this._finish(this._closeCode, this._closeReason);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error("the stream is not open");
    this._outbox.push(JSON.parse(text));
    this._flush();
  }

  async _flush() {
    if (this._posting) return;
    this._posting = true;
    try {
      while (this._outbox.length && !this._ended) {
        const commands = this._outbox.splice(0, 100);
        let response;
        try {
          response = await this._fetch(this._postUrl, {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ ...this._session, commands }),
            cache: "no-store",
          });
        } catch (err) {
          this._fail(`POST failed: ${err}`);
          return;
        }
        if (response.status !== 204) {
          // 404/403: the session is gone; anything else: the commands are lost.  Either
          // way the client reconnects and resumes.
          this._fail(`POST answered HTTP ${response.status}`);
          return;
        }
      }
    } finally {
      this._posting = false;
    }
  }

  _fail(why) {
    if (this._ended) return;
    if (this.onerror) this.onerror({ message: why });
    this._finish(this._closeCode ?? 1006, this._closeReason || why);
  }

  close(code = 1000, reason = "") {
    this._finish(code, reason);
  }

  _finish(code, reason) {
    if (this._ended) return;
    this._ended = true;
    this.readyState = 3;
    this._outbox = [];
    this._abort.abort();
    if (this._source) this._source.close();
    // Asynchronous, as a WebSocket's close event.
    setTimeout(() => {
      if (this.onclose) this.onclose({ code, reason });
    }, 0);
  }
}

/**
 * One channel subscription.  Its position (`offset`, `epoch`) is the last publication
 * delivered, and is what the client resumes from after a reconnect.
 */
export class Subscription {
  constructor(client, channel, options) {
    this.client = client;
    this.channel = channel;
    this.onPublication = options.onPublication || null;
    this.onJoin = options.onJoin || null;
    this.onLeave = options.onLeave || null;
    this.onUnsubscribed = options.onUnsubscribed || null;
    /** the subscription token: a string, or a (sync or async) function returning one */
    this.token = options.token ?? null;
    /** the token value last sent (sent again on a resubscribe when `token` is a string) */
    this._tokenValue = typeof this.token === "function" ? null : this.token;
    /** `{code, reason}` once the server ended this subscription (it is then forgotten) */
    this.ended = null;
    this.historyLimit = options.history || 0;
    this.offset = options.since ? options.since.offset : null;
    this.epoch = options.since ? options.since.epoch : null;
    /** true after the server confirmed the subscription on the current connection */
    this.active = false;
    /** the result of the last subscribe (recovered, recoverable, ...) */
    this.result = null;
    /** true while subscribe() runs: the reconnect logic leaves it alone */
    this._pending = true;
  }

  /** The position to resume from, or null before anything was seen. */
  get position() {
    return this.offset === null || this.epoch === null ? null : { offset: this.offset, epoch: this.epoch };
  }

  /** Deliver one publication unless it is one we already delivered. Returns whether delivered. */
  _deliver(pub) {
    if (this.epoch !== null && pub.epoch === this.epoch && this.offset !== null && pub.offset <= this.offset) {
      return false; // a duplicate (recovery overlap, or a race with history): drop it
    }
    this.offset = pub.offset;
    this.epoch = pub.epoch;
    const publication = { channel: this.channel, offset: pub.offset, epoch: pub.epoch, data: pub.data, info: pub.info || null };
    if (this.onPublication) {
      try {
        this.onPublication(publication);
      } catch (err) {
        this.client._emit("error", { error: err, where: "onPublication" });
      }
    }
    this.client._emit("publication", publication);
    return true;
  }

  unsubscribe() {
    return this.client.unsubscribe(this.channel);
  }

  /**
   * Replace this subscription's token with `token`, or a fresh one from the token
   * function.  Resolves with `{expires_at}`.  Done by itself on the server's
   * `sub_refresh` push when the subscription's token is a function.
   */
  refresh({ token, timeout } = {}) {
    return this.client._subRefresh(this, token, timeout);
  }
}

/**
 * A Herald protocol v1 client with automatic reconnect and resume.
 *
 * Options: `token` (string, or a function returning a string or a promise of one; called
 * on each connect so that it can refresh), `name` (sent in connect; the demos show it),
 * `minDelay` / `maxDelay` (reconnect backoff bounds, ms; defaults 250 / 10000),
 * `timeout` (default command timeout, ms; 10000), `WebSocket` (constructor to use),
 * `transports` (the order to try them in when one fails to open; default
 * `["websocket", "http_stream", "sse"]`: the last two are Herald's bidirectional emulation
 * over HTTP, for networks that block WebSocket), `fetch` and `EventSource` (to use).
 * `client.transport` names the transport in use; a "transport" event says when it changes.
 *
 * Events (listen with `client.on(type, fn)` which passes `detail`, or
 * `client.addEventListener(type, e => e.detail)`): connecting, connected,
 * disconnected, reconnecting, recovered, subscribed, unsubscribed, error, publication,
 * join, leave, disconnect, transport.
 */
export class HeraldClient extends EventTarget {
  constructor(url, options = {}) {
    super();
    if (url && typeof url === "object") {
      options = url;
      url = null;
    }
    this.url = url || defaultUrl();
    this.token = options.token ?? null;
    this.name = options.name ?? null;
    this.minDelay = options.minDelay ?? 250;
    this.maxDelay = options.maxDelay ?? 10000;
    this.timeout = options.timeout ?? 10000;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._fetchImpl = options.fetch || null;
    this._EventSource = options.EventSource || null;
    const transports = options.transports || TRANSPORTS;
    if (!Array.isArray(transports) || !transports.length || transports.some((t) => !TRANSPORTS.includes(t))) {
      throw new TypeError(`transports: a non-empty list of ${TRANSPORTS.join(", ")}`);
    }
    /** the transports to try, in order, when one fails to open */
    this.transports = transports.slice();
    /** the transport of the current connection ("websocket", "http_stream", "sse"), or null */
    this.transport = null;
    this._transportIndex = 0;
    /** "disconnected" | "connecting" | "connected" | "closed" */
    this.state = "disconnected";
    /** the connect result of the current connection (client id, user, ping_interval, ...) */
    this.info = null;
    /** @type {Map<string, Subscription>} */
    this.subscriptions = new Map();
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, timer}
    this._waiters = []; // commands waiting for a connection: {resolve, reject, timer}
    this._attempt = 0;
    this._reconnectTimer = null;
    this._livenessTimer = null;
    this._lastSeen = 0;
    this._everConnected = false;
    this._connectPromise = null;
    this._serverSaysNoReconnect = false;
    this._onOnline = () => {
      // The network is back: skip the rest of the backoff.
      if (this.state === "disconnected" && this._reconnectTimer !== null) {
        clearTimeout(this._reconnectTimer);
        this._reconnectTimer = null;
        this._open();
      }
    };
  }

  // ------------------------------------------------------------------ events

  /** Listen to `type`; `fn` receives the event's detail. Returns a function that stops listening. */
  on(type, fn) {
    const listener = (event) => fn(event.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // ------------------------------------------------------------------ lifecycle

  /**
   * Open the connection (and keep it open, reconnecting as needed).
   * Resolves with the connect result once connected the first time; rejects if the
   * server refuses for good (close code 4500-4999) before that.
   */
  connect() {
    if (this.state === "closed") this.state = "disconnected";
    if (!this._connectPromise) {
      this._connectPromise = new Promise((resolve, reject) => {
        this._resolveConnect = resolve;
        this._rejectConnect = reject;
      });
      this._serverSaysNoReconnect = false;
      if (typeof window !== "undefined") window.addEventListener("online", this._onOnline);
      this._open();
    } else if (this.state === "connected") {
      return Promise.resolve(this.info);
    }
    return this._connectPromise;
  }

  /** Close for good: no reconnect. Pending commands are rejected. */
  close() {
    this.state = "closed";
    this._connectPromise = null;
    if (this._reconnectTimer !== null) clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    if (typeof window !== "undefined") window.removeEventListener("online", this._onOnline);
    const ws = this._ws;
    this._ws = null;
    this._stopLiveness();
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(1000, "client closed");
      } catch (_) {
        /* already closing */
      }
    }
    this._failAll(new HeraldError(ClientErrorCode.CLOSED, "client closed"));
    for (const sub of this.subscriptions.values()) sub.active = false;
    this._emit("disconnected", { code: 1000, reason: "client closed", reconnect: false, byClient: true });
  }

  _open() {
    this._reconnectTimer = null;
    if (this.state === "closed") return;
    this.state = "connecting";
    const transport = this.transports[this._transportIndex];
    this._emit("connecting", { attempt: this._attempt, url: this.url, transport });
    let ws;
    try {
      if (transport === "websocket") {
        ws = new this._WebSocket(this.url, [SUBPROTOCOL]);
      } else {
        ws = new HttpStreamSocket(this.url, {
          sse: transport === "sse",
          fetch: this._fetchImpl || globalThis.fetch,
          EventSource: this._EventSource || globalThis.EventSource,
        });
      }
    } catch (err) {
      this._emit("error", { error: err, where: "open" });
      this._ws = null;
      this._onClose(null, 1006, String(err), transport);
      return;
    }
    this._ws = ws;
    ws._heraldTransport = transport;
    ws.onopen = () => {
      ws._heraldOpened = true;
      this._handshake(ws);
    };
    ws.onmessage = (event) => this._onFrame(ws, event.data);
    ws.onerror = () => {
      // Browsers hide why (a 403 on the handshake looks the same as a refused port);
      // the close event that follows carries the code.
      this._emit("error", { error: new HeraldError(0, "WebSocket error"), where: "socket" });
    };
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
  }

  async _handshake(ws) {
    this._lastSeen = Date.now();
    let token = this.token;
    try {
      if (typeof token === "function") token = await token();
    } catch (err) {
      this._emit("error", { error: err, where: "token" });
      ws.close(4000, "token callback failed");
      return;
    }
    if (ws !== this._ws) return;
    const command = { type: "connect" };
    if (token) command.token = token;
    if (this.name) command.name = String(this.name).slice(0, 64);
    let result;
    try {
      result = await this._send(command, this.timeout, true);
    } catch (err) {
      if (ws !== this._ws) return;
      this._emit("error", { error: err, where: "connect" });
      if (err.code === 111 || err.code === 112 || err.code === 110) {
        this._serverSaysNoReconnect = err.code !== 112; // an expired token may refresh
      }
      try {
        ws.close(4000, "connect failed");
      } catch (_) {
        /* closing anyway */
      }
      return;
    }
    if (ws !== this._ws) return;
    this.info = result;
    this.state = "connected";
    const previous = this.transport;
    this.transport = ws._heraldTransport;
    if (previous !== this.transport) this._emit("transport", { transport: this.transport, previous });
    const reconnected = this._everConnected;
    this._everConnected = true;
    this._attempt = 0;
    this._startLiveness();
    this._emit("connected", { ...result, reconnected, transport: this.transport });
    if (this._resolveConnect) {
      this._resolveConnect(result);
      this._resolveConnect = this._rejectConnect = null;
    }
    // Commands issued while offline go out now, then subscriptions are restored.
    const waiters = this._waiters;
    this._waiters = [];
    for (const waiter of waiters) {
      clearTimeout(waiter.timer);
      waiter.resolve();
    }
    this._resubscribe(reconnected);
  }

  _onClose(ws, code, reason, failedTransport = undefined) {
    if (ws !== this._ws) return;
    this._ws = null;
    // A transport that never opened (an upgrade refused by a proxy, no route): the next
    // one is tried at once; after the last, the first again, with the backoff.
    let fallback = false;
    if (failedTransport !== undefined || (ws && !ws._heraldOpened)) {
      this._transportIndex = (this._transportIndex + 1) % this.transports.length;
      fallback = this._transportIndex !== 0;
    }
    this._stopLiveness();
    const wasConnected = this.state === "connected";
    for (const sub of this.subscriptions.values()) sub.active = false;
    this._failPending(new HeraldError(ClientErrorCode.DISCONNECTED, `connection lost (${code})`));
    if (this.state === "closed") return;
    const reconnect = shouldReconnect(code) && !this._serverSaysNoReconnect;
    this.state = "disconnected";
    this._emit("disconnected", { code, reason, reconnect, wasConnected });
    if (!reconnect) {
      this.state = "closed";
      const error = new HeraldError(ClientErrorCode.CLOSED, `server closed the connection: ${code} ${reason}`);
      this._failAll(error);
      if (this._rejectConnect) {
        this._rejectConnect(error);
        this._resolveConnect = this._rejectConnect = null;
      }
      this._connectPromise = null;
      return;
    }
    if (fallback) {
      this._reconnectTimer = setTimeout(() => this._open(), 0);
      return;
    }
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code, reason) {
    // Exponential backoff with "full jitter" (a random delay up to the exponential bound,
    // never below minDelay) so that clients of a restarted server do not return in lockstep.
    const bound = Math.min(this.maxDelay, this.minDelay * 2 ** Math.min(this._attempt, 20));
    const delay = Math.round(this.minDelay + Math.random() * Math.max(0, bound - this.minDelay));
    this._attempt += 1;
    this.state = "disconnected";
    this._emit("reconnecting", { attempt: this._attempt, delay, code, reason });
    this._reconnectTimer = setTimeout(() => this._open(), delay);
  }

  /** Drop the socket as if the network failed (the client reconnects). Useful in tests. */
  reconnect() {
    if (this._ws) {
      this._ws.close(4000, "reconnect requested");
    }
  }

  _startLiveness() {
    this._stopLiveness();
    const interval = (this.info && this.info.ping_interval) || 0;
    if (interval <= 0) return;
    // The server pings every ping_interval seconds; silence for longer than that plus
    // pong_timeout means the path is dead even if the browser has not noticed.
    const limit = (interval + (this.info.pong_timeout || 10)) * 1000;
    this._livenessTimer = setInterval(() => {
      if (this._ws && Date.now() - this._lastSeen > limit) {
        this._emit("error", { error: new HeraldError(ClientErrorCode.TIMEOUT, "no ping from server"), where: "liveness" });
        const ws = this._ws;
        this._onClose(ws, 4002, "no ping from server");
        try {
          ws.close(4000, "no ping");
        } catch (_) {
          /* closing anyway */
        }
      }
    }, 1000);
  }

  _stopLiveness() {
    if (this._livenessTimer !== null) clearInterval(this._livenessTimer);
    this._livenessTimer = null;
  }

  // ------------------------------------------------------------------ frames

  _onFrame(ws, text) {
    if (ws !== this._ws) return;
    this._lastSeen = Date.now();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (err) {
      this._emit("error", { error: err, where: "frame" });
      return;
    }
    if (frame.id !== undefined && frame.id !== null) {
      const pending = this._pending.get(frame.id);
      if (!pending) return;
      this._pending.delete(frame.id);
      clearTimeout(pending.timer);
      if (frame.error) pending.reject(new HeraldError(frame.error.code, frame.error.message));
      else pending.resolve(frame.result ?? {});
      return;
    }
    switch (frame.type) {
      case "ping":
        ws.send('{"type":"pong"}');
        break;
      case "publication": {
        const sub = this.subscriptions.get(frame.channel);
        if (sub) sub._deliver(frame);
        break;
      }
      case "join":
      case "leave": {
        const sub = this.subscriptions.get(frame.channel);
        const detail = { channel: frame.channel, info: frame.info };
        const fn = sub && (frame.type === "join" ? sub.onJoin : sub.onLeave);
        if (fn) fn(detail);
        this._emit(frame.type, detail);
        break;
      }
      case "refresh":
        // The token expired: a token function gets a fresh one within the grace period
        // (a fixed string cannot be refreshed: the server closes with 4004).
        if (typeof this.token === "function") {
          this.refresh().catch((error) => this._emit("error", { error, where: "refresh" }));
        }
        break;
      case "sub_refresh": {
        // A subscription token expired: a token function gives a fresh one within the
        // grace period.  A fixed string cannot be refreshed: the server ends the
        // subscription (the `unsubscribe` push below).
        const sub = this.subscriptions.get(frame.channel);
        if (sub && typeof sub.token === "function") {
          sub.refresh().catch((error) => this._emit("error", { error, where: "sub_refresh", channel: sub.channel }));
        }
        break;
      }
      case "unsubscribe": {
        // The server ended a subscription (the connection stays): it must not come back
        // by itself on the next reconnect.
        const sub = this.subscriptions.get(frame.channel);
        if (sub) this._ended(sub, frame.code, frame.reason);
        break;
      }
      case "disconnect":
        // The close frame follows; remember whether the server wants us back.
        if (frame.reconnect === false) this._serverSaysNoReconnect = true;
        this._emit("disconnect", { code: frame.code, reason: frame.reason, reconnect: frame.reconnect });
        break;
      default:
        break;
    }
  }

  // ------------------------------------------------------------------ commands

  /**
   * Send a command and resolve with its result (reject with HeraldError on an error reply,
   * a timeout, or a lost connection).  Waits for the connection if it is being (re)opened.
   */
  async _send(command, timeout = this.timeout, handshake = false) {
    if (this.state === "closed") throw new HeraldError(ClientErrorCode.CLOSED, "client is closed");
    const started = Date.now();
    if (!handshake && this.state !== "connected") {
      if (!this._connectPromise) throw new HeraldError(ClientErrorCode.DISCONNECTED, "call connect() first");
      await new Promise((resolve, reject) => {
        const waiter = { resolve, reject, timer: null };
        waiter.timer = setTimeout(() => {
          this._waiters = this._waiters.filter((w) => w !== waiter);
          reject(new HeraldError(ClientErrorCode.TIMEOUT, `${command.type}: not connected within ${timeout} ms`));
        }, timeout);
        this._waiters.push(waiter);
      });
    }
    const ws = this._ws;
    const id = this._nextId++;
    const left = Math.max(1, timeout - (Date.now() - started));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new HeraldError(ClientErrorCode.TIMEOUT, `${command.type} timed out after ${timeout} ms`));
      }, left);
      this._pending.set(id, { resolve, reject, timer });
      try {
        ws.send(JSON.stringify({ id, ...command }));
      } catch (err) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(new HeraldError(ClientErrorCode.DISCONNECTED, String(err)));
      }
    });
  }

  _failPending(error) {
    const pending = this._pending;
    this._pending = new Map();
    for (const p of pending.values()) {
      clearTimeout(p.timer);
      p.reject(error);
    }
  }

  _failAll(error) {
    this._failPending(error);
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) {
      clearTimeout(w.timer);
      w.reject(error);
    }
  }

  /**
   * Subscribe to `channel`.  Options:
   * - `onPublication(pub)`: called for each publication `{channel, offset, epoch, data, info}`,
   *   in offset order, at most once each;
   * - `onJoin(e)`, `onLeave(e)`: presence pushes `{channel, info}`;
   * - `since: {offset, epoch}`: resume from a stored position (recovery);
   * - `history: N`: first deliver the last N publications, then the live stream with no gap;
   * - `token`: a subscription token (a JWT with `typ: "subscription"`, needed for private
   *   channels), or a (sync or async) function returning one: it is called for this
   *   subscribe, again for each resubscribe after a reconnect, and on the server's
   *   `sub_refresh` push (the token expired).  A fixed string is not refreshed: when it
   *   expires the server ends the subscription;
   * - `onUnsubscribed(e)`: the server ended the subscription, or refused to restore it
   *   after a reconnect: `{channel, code, reason}` (code 112: the token expired).
   * Resolves with the Subscription once the server confirmed it (its `result` says
   * `recovered`, `recoverable`, `offset`, `epoch`); rejects with HeraldError if refused.
   */
  async subscribe(channel, options = {}) {
    if (this.subscriptions.has(channel)) throw new HeraldError(108, `already subscribed to ${channel}`);
    const sub = new Subscription(this, channel, options);
    this.subscriptions.set(channel, sub);
    try {
      if (sub.historyLimit > 0 && sub.position === null) {
        // History first, then subscribe from its position: the server's recovery fills any
        // publication made in between, so nothing is missed or doubled.
        try {
          const history = await this.history(channel, { limit: sub.historyLimit, reverse: true });
          sub.epoch = history.epoch;
          sub.offset = Math.max(0, history.offset - history.publications.length);
          for (const pub of history.publications.slice().reverse()) {
            sub._deliver({ ...pub, epoch: history.epoch });
          }
          sub.offset = history.offset;
        } catch (err) {
          if (!(err instanceof HeraldError) || err.code < 100) throw err;
          // history not allowed here: a plain subscription still works
        }
      }
      let result;
      for (;;) {
        if (this.subscriptions.get(channel) !== sub) throw new HeraldError(109, "unsubscribed meanwhile");
        try {
          result = await this._subscribeBatch([sub]);
          break;
        } catch (err) {
          // The connection dropped before the reply: try again once reconnected (the
          // command waits for the connection within its timeout).
          if (!(err instanceof HeraldError) || err.code !== ClientErrorCode.DISCONNECTED || this.state === "closed") throw err;
        }
      }
      const item = result.find((i) => i.channel === channel);
      if (!item && this.subscriptions.get(channel) !== sub) throw new HeraldError(109, "unsubscribed meanwhile");
      if (!item) throw new HeraldError(100, "no result for this channel");
      if (item.error) throw new HeraldError(item.error.code, item.error.message);
      return sub;
    } catch (err) {
      if (this.subscriptions.get(channel) === sub) this.subscriptions.delete(channel);
      throw err;
    } finally {
      sub._pending = false;
    }
  }

  /**
   * Send one subscribe command for `subs` and apply the results.  `ws`: the connection a
   * resubscribe restores; if it is gone once the tokens are fetched, nothing is sent
   * (the next connection's resubscribe sends these subscriptions).
   */
  async _subscribeBatch(subs, resubscribe = false, ws = undefined) {
    const tokens = await Promise.all(subs.map((sub) => this._subscriptionToken(sub, ws !== undefined)));
    if (ws !== undefined && ws !== this._ws) return [];
    const channels = [];
    const sent = [];
    subs.forEach((sub, index) => {
      // The app may have unsubscribed while a token function ran.
      if (this.subscriptions.get(sub.channel) !== sub) return;
      const item = { channel: sub.channel };
      if (sub.position) item.since = sub.position;
      if (tokens[index]) item.token = tokens[index];
      channels.push(item);
      sent.push(sub);
    });
    if (!channels.length) return [];
    subs = sent;
    const result = await this._send({ type: "subscribe", channels });
    const items = result.channels || [];
    for (const item of items) {
      const sub = this.subscriptions.get(item.channel);
      if (!sub || !subs.includes(sub)) continue;
      if (item.error) {
        if (resubscribe) {
          this._emit("error", {
            error: new HeraldError(item.error.code, item.error.message),
            where: "resubscribe",
            channel: item.channel,
          });
          this._ended(sub, item.error.code, item.error.message);
        }
        continue;
      }
      const hadPosition = sub.position !== null;
      sub.active = true;
      sub.result = item;
      let delivered = 0;
      for (const pub of item.publications || []) {
        if (sub._deliver({ ...pub, epoch: item.epoch })) delivered += 1;
      }
      if (item.recovered === false || !hadPosition) {
        // Nothing to resume from, or a gap: continue from the stream's current top.
        sub.epoch = item.epoch;
        sub.offset = Math.max(sub.offset ?? 0, item.offset ?? 0);
        if (item.recovered === false) sub.offset = item.offset ?? 0;
      }
      const detail = {
        channel: item.channel,
        recovered: item.recovered,
        recoverable: item.recoverable,
        epoch: item.epoch,
        offset: item.offset,
        missed: delivered,
        resubscribed: resubscribe,
      };
      this._emit("subscribed", detail);
      if (hadPosition && item.recovered !== null && item.recovered !== undefined) this._emit("recovered", detail);
    }
    return items;
  }

  async _resubscribe(reconnected) {
    const subs = [...this.subscriptions.values()].filter((sub) => !sub.active && !sub._pending);
    if (!subs.length) return;
    try {
      await this._subscribeBatch(subs, reconnected, this._ws);
    } catch (err) {
      this._emit("error", { error: err, where: "resubscribe" });
    }
  }

  /**
   * The token to send with a subscribe of `sub`: a token function's next value, else the
   * last value.  When the function fails on a resubscribe (`restoring`) the last value is
   * sent (the server refuses it if it expired, which ends the subscription) and an
   * "error" event says why; on a first subscribe the failure rejects the subscribe.
   */
  async _subscriptionToken(sub, restoring) {
    if (typeof sub.token !== "function") return sub._tokenValue;
    try {
      sub._tokenValue = (await sub.token()) || null;
    } catch (error) {
      if (!restoring) throw error;
      this._emit("error", { error, where: "token", channel: sub.channel });
    }
    return sub._tokenValue;
  }

  /** Replace the subscription token of `sub` (see Subscription.refresh). */
  async _subRefresh(sub, token, timeout) {
    let value = token ?? sub.token;
    if (typeof value === "function") value = await value();
    if (!value) throw new Error(`no subscription token to refresh ${sub.channel} with`);
    const command = { type: "sub_refresh", channel: sub.channel, token: value };
    const result = await this._send(command, timeout ?? this.timeout);
    sub._tokenValue = value;
    return result;
  }

  /** The server ended `sub`, or refused to restore it: forget it and tell the app. */
  _ended(sub, code, reason) {
    if (this.subscriptions.get(sub.channel) === sub) this.subscriptions.delete(sub.channel);
    sub.active = false;
    sub.ended = { code, reason };
    const detail = { channel: sub.channel, code, reason };
    if (sub.onUnsubscribed) {
      try {
        sub.onUnsubscribed(detail);
      } catch (err) {
        this._emit("error", { error: err, where: "onUnsubscribed" });
      }
    }
    this._emit("unsubscribed", detail);
  }

  /** Stop receiving `channel`. */
  async unsubscribe(channel) {
    const sub = this.subscriptions.get(channel);
    if (!sub) return;
    this.subscriptions.delete(channel);
    if (this.state === "connected" && sub.active) {
      try {
        await this._send({ type: "unsubscribe", channels: [channel] });
      } catch (err) {
        if (!(err instanceof HeraldError) || err.code !== 109) throw err;
      }
    }
  }

  /** Publish `data` (any JSON value).  Resolves with `{offset, epoch}`. */
  publish(channel, data, { timeout } = {}) {
    return this._send({ type: "publish", channel, data }, timeout ?? this.timeout);
  }

  /** Call the server's RPC `method`.  Resolves with the handler's return value. */
  async rpc(method, params = null, { timeout } = {}) {
    const result = await this._send({ type: "rpc", method, params }, timeout ?? this.timeout);
    return result.data;
  }

  /** Who is in `channel`: `{clientId: {client, user, info}}`. */
  async presence(channel, { timeout } = {}) {
    const result = await this._send({ type: "presence", channel }, timeout ?? this.timeout);
    return result.clients;
  }

  /** `{num_clients, num_users}` of `channel`. */
  presenceStats(channel, { timeout } = {}) {
    return this._send({ type: "presence_stats", channel }, timeout ?? this.timeout);
  }

  /**
   * A channel's history: `{publications: [{offset, data, info}], offset, epoch}`.
   * Options: `limit`, `since: {offset, epoch}`, `reverse` (newest first).
   */
  history(channel, { limit, since, reverse, timeout } = {}) {
    const command = { type: "history", channel };
    if (limit !== undefined && limit !== null) command.limit = limit;
    if (since) command.since = since;
    if (reverse) command.reverse = true;
    return this._send(command, timeout ?? this.timeout);
  }

  /**
   * Replace the connection's token: `token`, or a fresh one from the token function.
   * Resolves with `{expires_at}`.  Done by itself on the server's `refresh` push.
   */
  async refresh({ token, timeout } = {}) {
    let value = token ?? this.token;
    if (typeof value === "function") value = await value();
    if (!value) throw new Error("no token to refresh with");
    return this._send({ type: "refresh", token: value }, timeout ?? this.timeout);
  }

  /** Round trip to the server. */
  ping({ timeout } = {}) {
    return this._send({ type: "ping" }, timeout ?? this.timeout);
  }
}

export default HeraldClient;
