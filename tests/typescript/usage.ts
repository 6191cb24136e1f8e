// A typed app using herald.js, checked with `tsc --strict` (never run): it must compile
// against src/herald/static/herald.d.ts, and each `@ts-expect-error` line must NOT
// compile (tsc fails on an expect-error that has no error), so the declarations are
// neither missing nor so loose that mistakes go through.

import HeraldDefault, {
  ClientErrorCode,
  HeraldClient,
  HeraldError,
  shouldReconnect,
  SUBPROTOCOL,
  Subscription,
  type ClientState,
  type ConnectResult,
  type HeraldClientOptions,
  type HeraldEventMap,
  type HistoryResult,
  type Publication,
  type PublishResult,
  type StreamPositionModel,
  type SubscribeOptions,
  type TransportName,
} from "../../src/herald/static/herald.js";

interface ChatMessage {
  name: string;
  text: string;
  time?: number;
}

const protocol: "herald.v1" = SUBPROTOCOL;
const reconnectAfterRestart: boolean = shouldReconnect(1012);
const timeoutCode: 1 = ClientErrorCode.TIMEOUT;
// @ts-expect-error: the codes are read-only
ClientErrorCode.CLOSED = 4;

const options: HeraldClientOptions = {
  token: async () => "jwt",
  name: "ada",
  minDelay: 100,
  maxDelay: 5000,
  timeout: 2000,
  WebSocket,
  transports: ["websocket", "http_stream", "sse"],
  fetch,
  EventSource,
};
const client: HeraldClient = new HeraldClient("wss://example.org/connect", options);
const byDefault = new HeraldClient();
const withOptionsOnly = new HeraldClient({ token: "jwt" });
const sameClass: typeof HeraldClient = HeraldDefault;
// @ts-expect-error: minDelay is a number of milliseconds
new HeraldClient({ minDelay: "fast" });
// @ts-expect-error: no such option
new HeraldClient({ reconnect: false });
// @ts-expect-error: no such transport
new HeraldClient({ transports: ["long_polling"] });

const state: ClientState = client.state;
const inUse: TransportName | null = client.transport;
const order: TransportName[] = client.transports;
console.log(inUse, order.length);
// @ts-expect-error: the transport in use is the client's own
client.transport = "sse";
client.on("transport", ({ transport, previous }) => console.log(transport, previous ?? "first"));
client.on("connecting", ({ transport }) => console.log(transport === "http_stream"));
// @ts-expect-error: the state is the client's own
client.state = "connected";

// Events: `on` passes the typed detail; addEventListener passes a CustomEvent of it.
const stop: () => void = client.on("reconnecting", ({ delay, attempt, code }) => {
  const seconds: number = delay / 1000 + attempt + code;
  console.log(seconds);
});
stop();
client.on("connected", (detail) => {
  const reconnected: boolean = detail.reconnected;
  const over: TransportName = detail.transport;
  console.log(over);
  const id: string = detail.client;
  const ping: number = detail.ping_interval;
  console.log(reconnected, id, ping);
});
client.on("disconnected", ({ code, reason, reconnect }) => console.log(code, reason.length, reconnect));
client.on("recovered", ({ channel, recovered, missed }) => console.log(channel, recovered === false, missed));
client.on("unsubscribed", ({ channel, code }) => console.log(channel, code === 112));
client.on("publication", (pub) => console.log(pub.channel, pub.offset, pub.epoch, pub.data));
client.on("join", ({ info }) => console.log(info.client, info.user));
client.on("error", ({ error, where, channel }) => {
  if (error instanceof HeraldError && error.code === ClientErrorCode.TIMEOUT) console.log(where, channel);
});
client.addEventListener("leave", (event) => console.log(event.detail.info.user));
client.addEventListener("subscribed", (event) => console.log(event.detail.resubscribed));
// @ts-expect-error: no such event
client.on("publish", () => undefined);
// @ts-expect-error: the reconnecting event has no `channel`
client.on("reconnecting", (detail) => detail.channel);
// @ts-expect-error: an error's `where` is one of a known set
client.on("error", ({ where }) => where === "nowhere");
const detailOfPublication: HeraldEventMap["publication"] = { channel: "c", offset: 1, epoch: "e", data: null, info: null };

async function app(): Promise<void> {
  const info: ConnectResult = await client.connect();
  console.log(info.user, info.version);

  const sub: Subscription<ChatMessage> = await client.subscribe<ChatMessage>("chat:lobby", {
    history: 50,
    onPublication: (pub: Publication<ChatMessage>) => console.log(pub.data.name, pub.data.text, pub.info?.user),
    onJoin: ({ channel, info }) => console.log(channel, info.client),
    onLeave: ({ info }) => console.log(info.client),
    onUnsubscribed: ({ code, reason }) => console.log(code, reason),
    token: () => Promise.resolve("subscription-jwt"),
  });
  const position: StreamPositionModel | null = sub.position;
  const active: boolean = sub.active;
  console.log(position?.offset, position?.epoch, active, sub.offset, sub.epoch, sub.ended?.code, sub.result?.recovered);
  await sub.refresh({ token: "another-jwt", timeout: 1000 });
  await sub.unsubscribe();
  // @ts-expect-error: onPublication receives one publication
  await client.subscribe("chat:x", { onPublication: (a: Publication, b: Publication) => console.log(a, b) });
  // @ts-expect-error: `since` is a position, not an offset
  await client.subscribe("chat:x", { since: 5 });

  const resume: SubscribeOptions = { since: { offset: 3, epoch: "abc" } };
  await client.subscribe("chat:other", resume);
  for (const [channel, each] of client.subscriptions) console.log(channel, each.channel);

  const published: PublishResult = await client.publish("chat:lobby", { text: "hi" }, { timeout: 500 });
  console.log(published.offset, published.epoch);
  const total = await client.rpc<number>("sum", [1, 2]);
  const doubled: number = total * 2;
  const who = await client.presence("chat:lobby");
  for (const [clientId, entry] of Object.entries(who)) console.log(clientId, entry.user, entry.info);
  const stats = await client.presenceStats("chat:lobby");
  console.log(doubled, stats.num_clients, stats.num_users);
  const history: HistoryResult = await client.history("chat:lobby", { limit: 10, reverse: true, since: position });
  for (const pub of history.publications) console.log(pub.offset, pub.data);
  const refreshed = await client.refresh({ token: () => "fresh" });
  console.log(refreshed.expires_at);
  await client.ping({ timeout: 100 });
  // @ts-expect-error: publish needs a channel and data
  await client.publish("chat:lobby");
  // @ts-expect-error: history's limit is a number
  await client.history("chat:lobby", { limit: "10" });
  // @ts-expect-error: not a method of the client
  await client.publsh("chat:lobby", {});
  client.reconnect();
  client.close();
}

try {
  throw new HeraldError(108, "already subscribed");
} catch (err) {
  if (err instanceof HeraldError) console.log(err.code, err.message, err.name);
}

console.log(protocol, reconnectAfterRestart, timeoutCode, byDefault, withOptionsOnly, sameClass, state, detailOfPublication);
void app();
