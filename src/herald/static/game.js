// Tic-tac-toe over a channel: game:<room> carries {type: "move"|"new", ...} publications.
// The board is a pure function of the channel's publications in offset order, so every
// browser computes the same state; the server's ordering settles races.
import { HeraldClient } from "./herald.js";
import { bindStatus, cleanRoom, el, param, tabId } from "./demo-common.js";

const $ = (id) => document.getElementById(id);
const me = tabId();
const LINES = [
  [0, 1, 2], [3, 4, 5], [6, 7, 8],
  [0, 3, 6], [1, 4, 7], [2, 5, 8],
  [0, 4, 8], [2, 4, 6],
];

let client = null;
let channel = null;
let state = freshState();
const watchers = new Map(); // client id -> name

function freshState() {
  return { board: Array(9).fill(""), players: { X: null, O: null }, turn: "X", winner: null, line: null, moves: 0 };
}

function text(value, max = 32) {
  return typeof value === "string" && value.trim() ? value.trim().slice(0, max) : "anonymous";
}

/** Apply one publication to the state (invalid moves are ignored the same way everywhere). */
function apply(data) {
  if (!data || typeof data !== "object") return;
  if (data.type === "new") {
    state = freshState();
    return;
  }
  if (data.type !== "move" || state.winner) return;
  const cell = data.cell;
  if (!Number.isInteger(cell) || cell < 0 || cell > 8 || state.board[cell]) return;
  const player = typeof data.player === "string" ? data.player.slice(0, 32) : "";
  if (!player) return;
  const mark = state.turn;
  const other = mark === "X" ? "O" : "X";
  const seat = state.players[mark];
  if (seat === null) {
    if (state.players[other] && state.players[other].id === player) return; // one seat each
    state.players[mark] = { id: player, name: text(data.name) };
  } else if (seat.id !== player) {
    return; // not your turn
  }
  state.board[cell] = mark;
  state.moves += 1;
  for (const line of LINES) {
    if (line.every((i) => state.board[i] === mark)) {
      state.winner = mark;
      state.line = line;
    }
  }
  if (!state.winner && state.moves === 9) state.winner = "draw";
  state.turn = other;
}

function myMark() {
  for (const mark of ["X", "O"]) if (state.players[mark] && state.players[mark].id === me) return mark;
  return null;
}

function canPlay() {
  if (state.winner || !client || client.state !== "connected") return false;
  const seat = state.players[state.turn];
  if (seat) return seat.id === me;
  const other = state.players[state.turn === "X" ? "O" : "X"];
  return !other || other.id !== me;
}

function render() {
  const board = $("board");
  const playable = canPlay();
  [...board.children].forEach((button, i) => {
    const mark = state.board[i];
    button.textContent = mark;
    button.dataset.mark = mark;
    button.disabled = Boolean(mark) || !playable;
    button.classList.toggle("win", Boolean(state.line && state.line.includes(i)));
    button.setAttribute("aria-label", `cell ${i + 1}${mark ? `: ${mark}` : ""}`);
  });
  board.dataset.board = state.board.map((m) => m || "-").join("");
  const mine = myMark();
  let line;
  if (state.winner === "draw") line = "Draw! Start a new game.";
  else if (state.winner) line = state.winner === mine ? "You win!" : `${state.players[state.winner].name} (${state.winner}) wins.`;
  else if (playable) line = `Your turn (${mine || state.turn})`;
  else if (state.players[state.turn]) line = `Waiting for ${state.players[state.turn].name} (${state.turn})…`;
  else line = `Waiting for a player to take ${state.turn}…`;
  $("turn").textContent = line;
  const players = $("players");
  players.replaceChildren(
    ...["X", "O"].map((mark) => {
      const li = el("li");
      li.append(el("span", { cls: "mark", text: mark }));
      const seat = state.players[mark];
      li.append(el("span", { text: seat ? `${seat.name}${seat.id === me ? " (you)" : ""}` : "free seat" }));
      return li;
    }),
  );
  const list = [...watchers.values()].sort();
  $("watchers").replaceChildren(...list.map((name) => el("li", { text: name })));
  $("watch-count").textContent = String(list.length);
}

function onPublication(pub) {
  apply(pub.data);
  render();
}

async function refreshPresence() {
  try {
    const clients = await client.presence(channel);
    watchers.clear();
    for (const [id, info] of Object.entries(clients)) watchers.set(id, text(info.info && info.info.name));
    render();
  } catch (err) {
    console.warn(err);
  }
}

async function join(name, room) {
  if (client) client.close();
  state = freshState();
  watchers.clear();
  channel = `game:${room}`;
  localStorage.setItem("herald-game-name", name);
  history.replaceState(null, "", `?room=${encodeURIComponent(room)}`);
  $("title").textContent = `Tic-tac-toe · ${room}`;
  delete document.body.dataset.ready;
  client = new HeraldClient({ name });
  window.heraldClient = client;
  bindStatus(client, $("status"), $("banner"));
  client.on("connected", render);
  client.on("disconnected", render);
  client.on("subscribed", ({ resubscribed }) => resubscribed && refreshPresence());
  client.on("recovered", ({ recovered }) => {
    if (recovered === false) {
      // Moves were lost: rebuild the board from what the history still holds.
      client.history(channel, { limit: 200 }).then((h) => {
        state = freshState();
        for (const pub of h.publications) apply(pub.data);
        render();
      });
    }
  });
  render();
  try {
    await client.connect();
    // The whole history (200 publications) replays the current game for late joiners.
    await client.subscribe(channel, {
      history: 200,
      onPublication,
      onJoin: ({ info }) => {
        watchers.set(info.client, text(info.info && info.info.name));
        render();
      },
      onLeave: ({ info }) => {
        watchers.delete(info.client);
        render();
      },
    });
    await refreshPresence();
    document.body.dataset.ready = "true";
  } catch (err) {
    $("turn").textContent = `Could not join: ${err.message}`;
  }
}

const board = $("board");
for (let i = 0; i < 9; i++) {
  const button = el("button", { attrs: { type: "button", "data-cell": i } });
  button.addEventListener("click", async () => {
    if (!canPlay() || state.board[i]) return;
    button.disabled = true;
    try {
      await client.publish(channel, { type: "move", cell: i, player: me, name: $("name").value.trim().slice(0, 32) });
    } catch (err) {
      $("turn").textContent = `Move not sent: ${err.message}`;
    }
  });
  board.append(button);
}

$("new-game").addEventListener("click", () => {
  if (client) client.publish(channel, { type: "new", player: me }).catch((err) => console.warn(err));
});

$("setup").addEventListener("submit", (event) => {
  event.preventDefault();
  join($("name").value.trim().slice(0, 32) || "anonymous", cleanRoom($("room").value));
});

$("name").value = param("name", localStorage.getItem("herald-game-name") || `player-${me.slice(0, 4)}`);
$("room").value = cleanRoom(param("room", "lobby"));
join($("name").value.trim().slice(0, 32), $("room").value);
