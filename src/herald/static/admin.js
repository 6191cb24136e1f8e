// Herald admin page: live over Herald itself (/admin/ws streams node snapshots published on
// the internal $admin channel); presence and publishing through the HTTP API.
// Everything received is rendered with textContent (never as HTML).

const KEY_STORAGE = "herald-admin-key";
const NODE_EXPIRY_MS = 15000;
const UNAUTHORIZED = 4501;

const $ = (id) => document.getElementById(id);
const nodes = new Map(); // node id -> {snapshot, seen}
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
let socket = null;
let retryTimer = null;

function setStatus(text) {
  $("status").textContent = text;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function liveNodes() {
  const now = Date.now();
  for (const [id, entry] of nodes) {
    if (now - entry.seen > NODE_EXPIRY_MS) nodes.delete(id);
  }
  return [...nodes.values()].map((entry) => entry.snapshot);
}

function render() {
  const snapshots = liveNodes();
  fill($("nodes"), snapshots.map((s) => {
    const tr = document.createElement("tr");
    cell(tr, s.node, "mono");
    cell(tr, s.broker);
    cell(tr, s.version);
    cell(tr, s.num_connections, "num");
    cell(tr, s.num_users, "num");
    cell(tr, s.uptime, "num");
    cell(tr, (s.stats || {}).publications, "num");
    return tr;
  }));

  const connections = [];
  let total = 0;
  for (const s of snapshots) {
    total += s.num_connections;
    for (const c of s.clients) connections.push([c, s.node]);
  }
  $("connection-count").textContent =
    connections.length < total ? `(${connections.length} of ${total} shown)` : `(${total})`;
  fill($("connections"), connections.map(([c, node]) => {
    const tr = document.createElement("tr");
    tr.dataset.client = c.client;
    cell(tr, c.client, "mono");
    cell(tr, c.user || "(anonymous)");
    cell(tr, c.remote, "mono");
    cell(tr, c.channels.join(", "), "list");
    cell(tr, c.age, "num");
    cell(tr, node, "mono");
    return tr;
  }));

  const channels = new Map();
  for (const s of snapshots) {
    for (const [name, count] of Object.entries(s.channels)) {
      channels.set(name, (channels.get(name) || 0) + count);
    }
  }
  const sorted = [...channels.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  fill($("channels"), sorted.map(([name, count]) => {
    const tr = document.createElement("tr");
    tr.dataset.channel = name;
    const link = document.createElement("a");
    link.href = "#";
    link.textContent = name;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      $("presence-channel").value = name;
      showPresence(name);
    });
    const td = document.createElement("td");
    td.appendChild(link);
    tr.appendChild(td);
    cell(tr, count, "num");
    return tr;
  }));
}

function showLogin(message) {
  $("panels").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus("locked");
}

function connect() {
  clearTimeout(retryTimer);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/admin/ws`);
  setStatus("connecting...");
  socket.onopen = () => socket.send(JSON.stringify({ api_key: apiKey }));
  socket.onmessage = (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    if (frame.type !== "publication" || frame.channel !== "$admin") return;
    const snapshot = frame.data;
    nodes.set(snapshot.node, { snapshot, seen: Date.now() });
    $("login").hidden = true;
    $("panels").hidden = false;
    setStatus(`live · ${new Date().toLocaleTimeString()}`);
    render();
  };
  socket.onclose = (event) => {
    if (event.code === UNAUTHORIZED) {
      sessionStorage.removeItem(KEY_STORAGE);
      showLogin(apiKey ? "That key was refused." : "");
      return;
    }
    setStatus(`disconnected (${event.code}); reconnecting...`);
    retryTimer = setTimeout(connect, 1000 + Math.random() * 1000);
  };
}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (apiKey) headers["X-API-Key"] = apiKey;
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

async function showPresence(channel) {
  $("presence-error").textContent = "";
  try {
    const body = await api(`/api/presence?channel=${encodeURIComponent(channel)}`);
    fill($("presence"), Object.entries(body.clients).map(([client, info]) => {
      const tr = document.createElement("tr");
      cell(tr, client, "mono");
      cell(tr, info.user || "(anonymous)");
      cell(tr, info.info === undefined || info.info === null ? "" : JSON.stringify(info.info), "mono list");
      return tr;
    }));
  } catch (error) {
    fill($("presence"), []);
    $("presence-error").textContent = error.message;
  }
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("key").value;
  sessionStorage.setItem(KEY_STORAGE, apiKey);
  connect();
});

$("presence-form").addEventListener("submit", (event) => {
  event.preventDefault();
  showPresence($("presence-channel").value.trim());
});

$("publish-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = $("publish-result");
  let data;
  try {
    data = JSON.parse($("publish-data").value);
  } catch (error) {
    result.textContent = `not JSON: ${error.message}`;
    return;
  }
  try {
    const position = await api("/api/publish", {
      method: "POST",
      body: JSON.stringify({ channel: $("publish-channel").value.trim(), data }),
    });
    result.textContent = `published at offset ${position.offset}`;
  } catch (error) {
    result.textContent = error.message;
  }
});

setInterval(() => { if (nodes.size) render(); }, 5000);
connect();
