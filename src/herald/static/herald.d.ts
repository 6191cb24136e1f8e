// Types of herald.js, the browser client: its classes, options and events.
//
// Written by hand next to herald.js and served beside it (/static/herald.d.ts).  The
// frames on the wire are typed in herald-protocol.d.ts (generated from the schema);
// this file types the client's own API on top of them.  tests/typescript checks it
// with `tsc --strict` against a typed usage file, and checks that every public name
// of herald.js is declared here and every name declared here exists in herald.js.

import type {
  ChannelSubscribeResult,
  ClientInfoModel,
  ConnectResult,
  HistoryResult,
  PingResult,
  PresenceStatsResult,
  PublishResult,
  RefreshResult,
  StreamPositionModel,
  SubRefreshResult,
} from "./herald-protocol.js";

export type {
  ChannelSubscribeResult,
  ClientInfoModel,
  ConnectResult,
  HistoryResult,
  PresenceStatsResult,
  PublishResult,
  RefreshResult,
  StreamPositionModel,
  SubRefreshResult,
} from "./herald-protocol.js";

/** The WebSocket subprotocol of Herald's protocol v1. */
export declare const SUBPROTOCOL: "herald.v1";

/** An error reply from the server, a timeout, or a lost connection. */
export declare class HeraldError extends Error {
  /**
   * @param code the protocol error code (100-121), or a `ClientErrorCode` (1-3) for
   *   client-side errors, or 0 for a socket error
   */
  constructor(code: number, message: string);
  name: "HeraldError";
  /** The protocol error code (100-121), or a `ClientErrorCode` value. */
  code: number;
}

/** Client-side error codes (below the protocol's 100-121 range). */
export declare const ClientErrorCode: Readonly<{
  /** A command got no reply, or no connection came, within its timeout. */
  TIMEOUT: 1;
  /** The connection was lost before the reply (or connect() was never called). */
  DISCONNECTED: 2;
  /** The client was closed, or the server closed it for good. */
  CLOSED: 3;
}>;
export type ClientErrorCode = (typeof ClientErrorCode)[keyof typeof ClientErrorCode];

/** Whether a client should reconnect after a WebSocket close with `code` (mirrors herald/codes.py). */
export declare function shouldReconnect(code: number): boolean;

/** A token, or a (sync or async) function returning one; called again whenever a fresh one is needed. */
export type TokenSource = string | (() => string | null | undefined | Promise<string | null | undefined>);

/** A constructor compatible with the browser's `WebSocket` (e.g. `ws` in Node). */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocket;

/**
 * How a client reaches the server: a WebSocket, or Herald's bidirectional emulation over
 * HTTP (frames down a streaming response read with `fetch` ("http_stream") or
 * `EventSource` ("sse"), commands up in POSTs), for networks that block WebSocket.
 */
export type TransportName = "websocket" | "http_stream" | "sse";

/** The state of a client: `closed` means no reconnect until connect() is called again. */
export type ClientState = "disconnected" | "connecting" | "connected" | "closed";

export interface HeraldClientOptions {
  /** A connection token (JWT), or a function returning one: called on each connect, so it can refresh. */
  token?: TokenSource | null;
  /** Sent in the connect command (at most 64 characters); shown in presence `info.name`. */
  name?: string | null;
  /** Lower bound of the reconnect backoff, ms (default 250). */
  minDelay?: number;
  /** Upper bound of the reconnect backoff, ms (default 10000). */
  maxDelay?: number;
  /** Default command timeout, ms (default 10000). */
  timeout?: number;
  /** The WebSocket constructor to use (default: `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructor;
  /**
   * The transports to try, in order: when one fails to open, the next is tried at once
   * (default `["websocket", "http_stream", "sse"]`).  The one that connected is kept
   * for reconnects.
   */
  transports?: TransportName[];
  /** The `fetch` to use for "http_stream" and the POSTs (default: `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** The EventSource constructor to use for "sse" (default: `globalThis.EventSource`). */
  EventSource?: typeof EventSource;
}

/** One publication as delivered to `onPublication` and the "publication" event. */
export interface Publication<T = unknown> {
  channel: string;
  offset: number;
  epoch: string;
  data: T;
  /** Who published it (null for publications made through the HTTP API). */
  info: ClientInfoModel | null;
}

/** A presence change: the "join" and "leave" events, `onJoin` and `onLeave`. */
export interface PresenceEvent {
  channel: string;
  info: ClientInfoModel;
}

/** The server ended a subscription, or refused to restore it after a reconnect. */
export interface UnsubscribedEvent {
  channel: string;
  /** A protocol error code: 112 when the subscription token expired. */
  code: number;
  reason: string;
}

export interface SubscribeOptions<T = unknown> {
  /** Called for each publication, in offset order, at most once each. */
  onPublication?: (publication: Publication<T>) => void;
  onJoin?: (event: PresenceEvent) => void;
  onLeave?: (event: PresenceEvent) => void;
  /** The server ended the subscription, or refused to restore it after a reconnect. */
  onUnsubscribed?: (event: UnsubscribedEvent) => void;
  /** Resume from a stored position (recovery). */
  since?: StreamPositionModel | null;
  /** First deliver the last N publications, then the live stream with no gap. */
  history?: number;
  /** A subscription token (needed for private channels), or a function returning one. */
  token?: TokenSource | null;
}

/** Per-call options of the commands. */
export interface CommandOptions {
  /** This command's timeout, ms (default: the client's `timeout`). */
  timeout?: number;
}

export interface HistoryOptions extends CommandOptions {
  limit?: number | null;
  /** Publications after this position. */
  since?: StreamPositionModel | null;
  /** Newest first. */
  reverse?: boolean;
}

export interface RefreshOptions extends CommandOptions {
  /** The new token (default: a fresh one from the token function). */
  token?: TokenSource | null;
}

// ------------------------------------------------------------------ events

export interface ConnectingEvent {
  attempt: number;
  url: string;
  /** The transport this attempt uses. */
  transport: TransportName;
}

export interface ConnectedEvent extends ConnectResult {
  /** false on the first connection, true on every reconnection. */
  reconnected: boolean;
  /** The transport of this connection. */
  transport: TransportName;
}

/** The "transport" event: the client connected over another transport than before. */
export interface TransportEvent {
  transport: TransportName;
  /** The transport of the previous connection (null on the first). */
  previous: TransportName | null;
}

export interface DisconnectedEvent {
  code: number;
  reason: string;
  /** Whether the client will reconnect by itself. */
  reconnect: boolean;
  /** Set when the connection had completed its handshake. */
  wasConnected?: boolean;
  /** Set when close() was called. */
  byClient?: boolean;
}

export interface ReconnectingEvent {
  attempt: number;
  /** Milliseconds until the next try. */
  delay: number;
  code: number;
  reason: string;
}

/** The "subscribed" and "recovered" events. */
export interface SubscribedEvent {
  channel: string;
  /** Set when the subscribe resumed from a position: were all missed publications sent? */
  recovered?: boolean | null;
  recoverable?: boolean;
  epoch?: string | null;
  offset?: number | null;
  /** Publications delivered by this subscribe (recovered ones). */
  missed: number;
  /** true when restored after a reconnect. */
  resubscribed: boolean;
}

/** Where an "error" event comes from. */
export type ErrorSource =
  | "open"
  | "socket"
  | "token"
  | "connect"
  | "liveness"
  | "frame"
  | "refresh"
  | "sub_refresh"
  | "resubscribe"
  | "onPublication"
  | "onUnsubscribed";

export interface HeraldErrorEvent {
  /** A HeraldError, or whatever a callback or token function threw. */
  error: unknown;
  where: ErrorSource;
  /** The channel concerned, for subscription errors. */
  channel?: string;
}

/** The server's disconnect push (the close frame follows). */
export interface DisconnectEvent {
  code: number;
  reason: string;
  reconnect: boolean;
}

/** Each event's `detail`, by event type. */
export interface HeraldEventMap {
  connecting: ConnectingEvent;
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  reconnecting: ReconnectingEvent;
  recovered: SubscribedEvent;
  subscribed: SubscribedEvent;
  unsubscribed: UnsubscribedEvent;
  error: HeraldErrorEvent;
  publication: Publication;
  join: PresenceEvent;
  leave: PresenceEvent;
  disconnect: DisconnectEvent;
  transport: TransportEvent;
}

export type HeraldEventType = keyof HeraldEventMap;

// ------------------------------------------------------------------ classes

/**
 * One channel subscription, made by `HeraldClient.subscribe`.  Its position (`offset`,
 * `epoch`) is the last publication delivered, and is what the client resumes from after
 * a reconnect.
 */
export declare class Subscription<T = unknown> {
  /** Made by HeraldClient.subscribe; not meant to be called by apps. */
  constructor(client: HeraldClient, channel: string, options: SubscribeOptions<T>);
  readonly client: HeraldClient;
  readonly channel: string;
  onPublication: ((publication: Publication<T>) => void) | null;
  onJoin: ((event: PresenceEvent) => void) | null;
  onLeave: ((event: PresenceEvent) => void) | null;
  onUnsubscribed: ((event: UnsubscribedEvent) => void) | null;
  /** The subscription token: a string, or a function returning one. */
  token: TokenSource | null;
  /** `{code, reason}` once the server ended this subscription (it is then forgotten). */
  ended: { code: number; reason: string } | null;
  historyLimit: number;
  /** The offset of the last publication delivered, or null before anything was seen. */
  offset: number | null;
  epoch: string | null;
  /** true after the server confirmed the subscription on the current connection. */
  active: boolean;
  /** The result of the last subscribe (recovered, recoverable, offset, epoch). */
  result: ChannelSubscribeResult | null;
  /** The position to resume from, or null before anything was seen. */
  readonly position: StreamPositionModel | null;
  unsubscribe(): Promise<void>;
  /** Replace this subscription's token with `token`, or a fresh one from the token function. */
  refresh(options?: RefreshOptions): Promise<SubRefreshResult>;
}

/**
 * A Herald protocol v1 client with automatic reconnect and resume.
 *
 * Listen with `client.on(type, detail => ...)`, or with
 * `client.addEventListener(type, event => event.detail)`.
 */
export declare class HeraldClient extends EventTarget {
  /** `url` defaults to ws(s)://<this page's host>/connect. */
  constructor(url?: string | null, options?: HeraldClientOptions);
  constructor(options: HeraldClientOptions);
  readonly url: string;
  token: TokenSource | null;
  name: string | null;
  minDelay: number;
  maxDelay: number;
  timeout: number;
  readonly state: ClientState;
  /** The transports tried, in order (the `transports` option). */
  readonly transports: TransportName[];
  /** The transport of the current (or last) connection; null before the first. */
  readonly transport: TransportName | null;
  /** The connect result of the current connection (client id, user, ping_interval, ...). */
  readonly info: ConnectResult | null;
  readonly subscriptions: Map<string, Subscription>;

  /** Listen to `type`; `listener` receives the event's detail.  Returns a function that stops listening. */
  on<K extends HeraldEventType>(type: K, listener: (detail: HeraldEventMap[K]) => void): () => void;
  addEventListener<K extends HeraldEventType>(
    type: K,
    listener: (event: CustomEvent<HeraldEventMap[K]>) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends HeraldEventType>(
    type: K,
    listener: (event: CustomEvent<HeraldEventMap[K]>) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;

  /**
   * Open the connection and keep it open, reconnecting as needed.  Resolves with the
   * connect result once connected; rejects if the server refuses for good first.
   */
  connect(): Promise<ConnectResult>;
  /** Close for good: no reconnect.  Pending commands are rejected. */
  close(): void;
  /** Drop the socket as if the network failed (the client reconnects).  Useful in tests. */
  reconnect(): void;
  /** Subscribe to `channel`; resolves once the server confirmed it, rejects with HeraldError if refused. */
  subscribe<T = unknown>(channel: string, options?: SubscribeOptions<T>): Promise<Subscription<T>>;
  /** Stop receiving `channel`. */
  unsubscribe(channel: string): Promise<void>;
  /** Publish `data` (any JSON value). */
  publish(channel: string, data: unknown, options?: CommandOptions): Promise<PublishResult>;
  /** Call the server's RPC `method`; resolves with the handler's return value. */
  rpc<R = unknown>(method: string, params?: unknown, options?: CommandOptions): Promise<R>;
  /** Who is in `channel`, by client id. */
  presence(channel: string, options?: CommandOptions): Promise<Record<string, ClientInfoModel>>;
  presenceStats(channel: string, options?: CommandOptions): Promise<PresenceStatsResult>;
  /** A channel's history. */
  history(channel: string, options?: HistoryOptions): Promise<HistoryResult>;
  /** Replace the connection's token: `token`, or a fresh one from the token function. */
  refresh(options?: RefreshOptions): Promise<RefreshResult>;
  /** Round trip to the server. */
  ping(options?: CommandOptions): Promise<PingResult>;
}

export default HeraldClient;
