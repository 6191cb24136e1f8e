// The chat demo: rooms are channels chat:<room>, messages are {name, text, tab}.
import { HeraldClient } from "./herald.js";
import { bindStatus, cleanRoom, el, param, tabId } from "./demo-common.js";

const $ = (id) => document.getElementById(id);
const me = tabId();
let client = null;
let channel = null;
const people = new Map(); // client id -> name
const seen = new Set(); // offsets shown (history reloads may repeat some)

/** The send time a message carries in its data (`time`: ms since 1970, or an ISO date), or null. */
function sentTime(data) {
  const value = data.time;
  const ms = typeof value === "number" ? value : typeof value === "string" ? Date.parse(value) : NaN;
  const date = new Date(ms); // Invalid Date for NaN and for numbers past the year 275760
  return ms > 0 && !Number.isNaN(date.getTime()) ? date : null;
}

/** "14:05" today; "Mar 4, 14:05" another day; with the year when it is not this year's. */
function shortDate(when) {
  const now = new Date();
  const clock = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (when.toDateString() === now.toDateString()) return clock;
  const year = when.getFullYear() === now.getFullYear() ? undefined : "numeric";
  return `${when.toLocaleDateString([], { year, month: "short", day: "numeric" })}, ${clock}`;
}

/**
 * The time shown next to a message.  Herald's publication push carries no timestamp
 * (channel, offset, epoch, data, info), so the only send time is one the publisher put
 * in the data: this page sends `time`.  A message without one (from a backend, say)
 * shows when this browser received it, labelled "received" so it never passes for the
 * send time; the list itself is always in offset order, whatever the times say.
 */
function timeLabel(data) {
  const sent = sentTime(data);
  const when = sent || new Date();
  return el("time", {
    cls: sent ? "time" : "time received",
    text: sent ? shortDate(when) : `received ${shortDate(when)}`,
    attrs: {
      datetime: when.toISOString(),
      "data-source": sent ? "sent" : "received",
      title: sent
        ? `Sent ${when.toLocaleString()} (the sender's clock)`
        : `Received ${when.toLocaleString()}: the message carries no send time`,
    },
  });
}

function showMessage(pub) {
  if (seen.has(pub.offset)) return;
  seen.add(pub.offset);
  const data = pub.data && typeof pub.data === "object" ? pub.data : { text: pub.data };
  const name = typeof data.name === "string" && data.name.trim() ? data.name.slice(0, 32) : "anonymous";
  const text = typeof data.text === "string" ? data.text.slice(0, 2000) : JSON.stringify(data.text ?? data);
  const li = el("li", { cls: data.tab === me ? "me" : "", attrs: { "data-offset": pub.offset } });
  li.append(el("span", { cls: "who", text: name }), timeLabel(data), el("div", { cls: "text", text }));
  // Keep the list in offset order even when a history reload arrives after live messages.
  const list = $("messages");
  let before = null;
  for (let node = list.lastElementChild; node; node = node.previousElementSibling) {
    const offset = Number(node.dataset.offset);
    if (!Number.isNaN(offset) && offset < pub.offset) break;
    if (!Number.isNaN(offset)) before = node;
  }
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.insertBefore(li, before);
  if (atBottom || data.tab === me) list.scrollTop = list.scrollHeight;
}

function systemLine(text) {
  const list = $("messages");
  list.append(el("li", { cls: "system", text }));
  list.scrollTop = list.scrollHeight;
}

function nameOf(info) {
  const name = info && info.info && typeof info.info.name === "string" ? info.info.name : "";
  return name || (info && info.user) || "anonymous";
}

function renderPeople() {
  const list = $("people");
  const ownId = client && client.info ? client.info.client : null;
  const items = [...people.entries()].sort((a, b) => a[1].localeCompare(b[1]));
  list.replaceChildren(
    ...items.map(([id, name]) => {
      const li = el("li", { attrs: { "data-client": id } });
      li.append(el("span", { cls: "name", text: name }));
      if (id === ownId) li.append(el("span", { cls: "you", text: "(you)" }));
      return li;
    }),
  );
  $("people-count").textContent = String(items.length);
}

async function refreshPresence() {
  if (!client || !channel) return;
  try {
    const clients = await client.presence(channel);
    people.clear();
    for (const [id, info] of Object.entries(clients)) people.set(id, nameOf(info));
    renderPeople();
  } catch (err) {
    console.warn("presence failed", err);
  }
}

async function join(name, room) {
  if (client) client.close();
  people.clear();
  seen.clear();
  $("messages").replaceChildren();
  renderPeople();
  channel = `chat:${room}`;
  localStorage.setItem("herald-chat-name", name);
  history.replaceState(null, "", `?room=${encodeURIComponent(room)}`);
  $("title").textContent = `Chat · #${room}`;
  $("room-label").textContent = `#${room}`;
  $("join-panel").hidden = true;
  $("room-view").hidden = false;

  client = new HeraldClient({ name });
  window.heraldClient = client; // handy in the console (and in the browser tests)
  bindStatus(client, $("status"), $("banner"));
  client.on("subscribed", ({ resubscribed }) => {
    if (resubscribed) refreshPresence();
  });
  client.on("recovered", ({ recovered, missed }) => {
    if (recovered === false) {
      // The gap could not be filled from history: reload what the history still has.
      systemLine("Some messages could not be recovered; showing the recent history.");
      client.history(channel, { limit: 50, reverse: true }).then((h) => {
        for (const pub of h.publications.slice().reverse()) showMessage(pub);
      });
    } else if (missed > 0) {
      document.body.dataset.recovered = String(Number(document.body.dataset.recovered || 0) + missed);
    }
  });
  try {
    await client.connect();
    await client.subscribe(channel, {
      history: 50,
      onPublication: showMessage,
      onJoin: ({ info }) => {
        people.set(info.client, nameOf(info));
        renderPeople();
      },
      onLeave: ({ info }) => {
        people.delete(info.client);
        renderPeople();
      },
    });
    await refreshPresence();
    document.body.dataset.ready = "true";
    $("text").focus();
  } catch (err) {
    systemLine(`Could not join: ${err.message}`);
  }
}

$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("name").value.trim().slice(0, 32);
  if (!name) return;
  join(name, cleanRoom($("room").value));
});

$("send-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("text");
  const text = input.value.trim();
  if (!text || !client) return;
  input.value = "";
  try {
    await client.publish(channel, { name: $("name").value.trim().slice(0, 32), text, tab: me, time: Date.now() });
  } catch (err) {
    systemLine(`Not sent (${err.message}): ${text}`);
  }
});

$("leave").addEventListener("click", () => {
  if (client) client.close();
  client = null;
  $("room-view").hidden = true;
  $("join-panel").hidden = false;
  $("title").textContent = "Chat";
  delete document.body.dataset.ready;
});

$("name").value = param("name", localStorage.getItem("herald-chat-name") || "");
$("room").value = cleanRoom(param("room", "lobby"));
if (param("name") && param("join") === "1") join($("name").value.trim().slice(0, 32), $("room").value);
