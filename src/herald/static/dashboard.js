// The live dashboard: the server publishes its figures to dashboard:metrics once a second
// (see herald/demos.py); this page draws them as hand-made SVG charts.
import { HeraldClient } from "./herald.js";
import { bindStatus } from "./demo-common.js";

const SVG = "http://www.w3.org/2000/svg";
const WINDOW = 60; // points kept: one minute
const $ = (id) => document.getElementById(id);

const CARDS = [
  { key: "connections", label: "Connections", unit: "", color: "#3b5bdb", digits: 0 },
  { key: "messages_in_per_s", label: "Messages in", unit: "/s", color: "#3b5bdb", digits: 1 },
  { key: "messages_out_per_s", label: "Messages out", unit: "/s", color: "#f08c00", digits: 1 },
  { key: "publish_latency_ms", label: "Publish latency", unit: "ms", color: "#7048e8", digits: 2 },
  { key: "loop_lag_ms", label: "Loop lag", unit: "ms", color: "#c2255c", digits: 1 },
  { key: "cpu_percent", label: "CPU", unit: "%", color: "#2b8a3e", digits: 1 },
];

const points = []; // aggregated samples, oldest first
window.dashboardPoints = points; // for the console (and the browser tests)
const latest = new Map(); // node id -> its newest sample (several workers publish their own)
let updates = 0;

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function buildCards() {
  const root = $("cards");
  for (const card of CARDS) {
    const box = document.createElement("div");
    box.className = "panel card";
    box.dataset.key = card.key;
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = card.label;
    const value = document.createElement("div");
    value.className = "value";
    const number = document.createElement("span");
    number.className = "number";
    number.textContent = "–";
    const unit = document.createElement("span");
    unit.className = "unit";
    unit.textContent = card.unit;
    value.append(number, unit);
    const spark = svgEl("svg", { viewBox: "0 0 100 30", preserveAspectRatio: "none", "aria-hidden": "true" });
    box.append(label, value, spark);
    root.append(box);
    card.number = number;
    card.spark = spark;
  }
}

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

/** Points the x axis spans: the whole window once full; before that, what there is (at least 10). */
function span() {
  return Math.max(10, Math.min(WINDOW, points.length)) - 1;
}

function pathFor(values, width, height, max, pad = 0) {
  const n = values.length;
  if (!n) return "";
  const step = width / span();
  const x0 = width - (n - 1) * step; // newest point at the right edge
  return values
    .map((v, i) => {
      const x = x0 + i * step;
      const y = pad + (height - 2 * pad) * (1 - Math.min(v, max) / max);
      return `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
    })
    .join(" ");
}

function drawSpark(card) {
  const values = points.map((p) => p[card.key] ?? 0);
  const max = niceMax(Math.max(...values, 0) * 1.1);
  const line = pathFor(values, 100, 30, max, 2);
  const area = line ? `${line} L100,30 L${(100 - (values.length - 1) * (100 / span())).toFixed(1)},30 Z` : "";
  card.spark.replaceChildren(
    svgEl("path", { d: area, fill: card.color, "fill-opacity": 0.1, stroke: "none" }),
    svgEl("path", { d: line, fill: "none", stroke: card.color, "stroke-width": 1.5, "vector-effect": "non-scaling-stroke" }),
  );
}

function drawChart(svg, series) {
  // Draw in the element's own pixel size so that text and strokes are not stretched.
  const width = Math.max(200, Math.round(svg.clientWidth || 600));
  const height = Math.max(120, Math.round(svg.clientHeight || 260));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const left = 40;
  const bottom = 20;
  const top = 10;
  const plotW = width - left - 8;
  const plotH = height - top - bottom;
  const all = series.flatMap((s) => points.map((p) => p[s.key] ?? 0));
  const max = niceMax(Math.max(...all, 0) * 1.1);
  const grid = svgEl("g", { class: "grid" });
  const axis = svgEl("g", { class: "axis" });
  for (let i = 0; i <= 4; i++) {
    const y = top + (plotH * i) / 4;
    grid.append(svgEl("line", { x1: left, x2: width - 8, y1: y, y2: y }));
    const label = svgEl("text", { x: left - 6, y: y + 4, "text-anchor": "end" });
    label.textContent = String(+(max * (1 - i / 4)).toFixed(2));
    axis.append(label);
  }
  const seconds = Math.round(span() * (points.length ? points[points.length - 1].interval || 1 : 1));
  for (const [text, x] of [[`-${seconds} s`, left], [`-${Math.round(seconds / 2)} s`, left + plotW / 2], ["now", width - 8]]) {
    const label = svgEl("text", { x, y: height - 4, "text-anchor": x === left ? "start" : x === width - 8 ? "end" : "middle" });
    label.textContent = text;
    axis.append(label);
  }
  const plot = svgEl("g", { transform: `translate(${left},${top})` });
  for (const s of series) {
    const values = points.map((p) => p[s.key] ?? 0);
    plot.append(
      svgEl("path", {
        d: pathFor(values, plotW, plotH, max),
        fill: "none",
        stroke: s.color,
        "stroke-width": 2,
        "stroke-linejoin": "round",
        "vector-effect": "non-scaling-stroke",
        "data-series": s.key,
      }),
    );
  }
  svg.replaceChildren(grid, axis, plot);
  svg.dataset.points = String(points.length);
}

function render() {
  const last = points[points.length - 1];
  for (const card of CARDS) {
    const value = last ? last[card.key] ?? 0 : null;
    card.number.textContent = value === null ? "–" : Number(value).toFixed(card.digits);
    drawSpark(card);
  }
  drawChart($("chart"), [
    { key: "messages_in_per_s", color: "#3b5bdb" },
    { key: "messages_out_per_s", color: "#f08c00" },
  ]);
  drawChart($("chart-load"), [
    { key: "cpu_percent", color: "#2b8a3e" },
    { key: "loop_lag_ms", color: "#c2255c" },
  ]);
}

/** Fold one node's sample in; returns an aggregated point when this node leads (or is alone). */
function aggregate(sample) {
  if (!sample || typeof sample !== "object" || typeof sample.node !== "string") return null;
  latest.set(sample.node, sample);
  const horizon = sample.time - 2.5 * (sample.interval || 1);
  const fresh = [...latest.values()].filter((s) => s.time >= horizon);
  for (const [node, s] of latest) if (s.time < horizon) latest.delete(node);
  // One chart point per interval: emitted when the node with the smallest id reports.
  const leader = fresh.map((s) => s.node).sort()[0];
  if (sample.node !== leader) return null;
  const sum = (key) => fresh.reduce((total, s) => total + (Number(s[key]) || 0), 0);
  const most = (key) => Math.max(...fresh.map((s) => Number(s[key]) || 0));
  $("nodes").textContent = fresh.length > 1 ? `${fresh.length} nodes.` : "";
  return {
    time: sample.time,
    connections: sum("connections"),
    messages_in_per_s: sum("messages_in_per_s"),
    messages_out_per_s: sum("messages_out_per_s"),
    publish_latency_ms: most("publish_latency_ms"),
    loop_lag_ms: most("loop_lag_ms"),
    cpu_percent: sum("cpu_percent"),
    interval: sample.interval || 1,
  };
}

function onSample(pub) {
  const point = aggregate(pub.data);
  if (!point) return;
  points.push(point);
  while (points.length > WINDOW) points.shift();
  render();
  // For tests and curious readers: how many samples were drawn, and the newest one's time.
  const chart = $("chart");
  updates += 1;
  chart.dataset.updates = String(updates);
  chart.dataset.lastTime = String(point.time);
}

buildCards();
render();
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(render, 100);
});
const client = new HeraldClient({ name: "dashboard" });
window.heraldClient = client;
bindStatus(client, $("status"), $("banner"));
client.connect().catch((err) => console.warn(err));
// history: 60 fills the chart with the last minute right away.
client
  .subscribe("dashboard:metrics", { history: WINDOW, onPublication: onSample })
  .then(() => {
    document.body.dataset.ready = "true";
  })
  .catch((err) => console.warn("subscribe failed", err));

// Traffic for the chart to show: a burst of publications on a channel this page listens to.
client.subscribe("dashboard-load", {}).catch(() => {});
$("burst").addEventListener("click", async () => {
  const button = $("burst");
  button.disabled = true;
  try {
    await Promise.all(Array.from({ length: 200 }, (_, i) => client.publish("dashboard-load", { i })));
  } catch (err) {
    console.warn(err);
  } finally {
    button.disabled = false;
  }
});
