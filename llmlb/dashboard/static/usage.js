// Usage page: charts over time from GET /v0/usage (hourly roll-ups), drawn with uPlot
// (vendored: uPlot.iife.min.js, MIT), with a time range, filters from the URL
// (?key=&model=&node=, as the Requests page links them), refreshed every 10 s.
"use strict";

const form = document.getElementById("range");
const summary = document.getElementById("summary");
const totals = document.getElementById("totals");
const REFRESH_MS = 10000;
const COLORS = ["#4f46e5", "#0891b2", "#16a34a", "#d97706", "#dc2626", "#9333ea", "#db2777", "#64748b"];
const charts = {};

for (const name of ["key", "model", "node"]) {
  const given = new URLSearchParams(location.search).get(name);
  if (given) form.elements[name].value = given;
}
const rangeGiven = new URLSearchParams(location.search).get("range");
if (rangeGiven) form.elements.range.value = rangeGiven;

function query(extra) {
  const params = new URLSearchParams(extra);
  const range = Number(form.elements.range.value);
  params.set("from", String(Math.floor(Date.now() / 1000) - range));
  params.set("bucket", range > 7 * 86400 ? "day" : "hour");
  for (const name of ["key", "model", "node"]) {
    const value = form.elements[name].value.trim();
    if (value) params.set(name, value);
  }
  return params;
}

// Every bucket start of the range, oldest first: a bucket without requests is drawn as 0.
function bucketStarts(data) {
  const step = data.bucket === "day" ? 86400 : 3600;
  const first = Math.floor(data.from / step) * step;
  const xs = [];
  for (let x = first; x <= Date.now() / 1000; x += step) xs.push(x);
  return xs;
}

// One field per group (key or model) over the range's buckets.
function perGroup(data, group, value) {
  const xs = bucketStarts(data);
  const index = new Map(xs.map((x, i) => [x, i]));
  const names = [...new Set(data.data.map((d) => d[group] ?? "(none)"))].sort();
  const ys = names.map(() => xs.map(() => 0));
  for (const d of data.data) {
    const i = index.get(d.start);
    if (i !== undefined) ys[names.indexOf(d[group] ?? "(none)")][i] += value(d);
  }
  return { xs, names, ys };
}

// Fields of the ungrouped answer over the range's buckets (``empty`` where none).
function fields(data, names, empty) {
  const xs = bucketStarts(data);
  const byStart = new Map(data.data.map((d) => [d.start, d]));
  return { xs, ys: names.map((f) => xs.map((x) => byStart.has(x) ? byStart.get(x)[f] : empty)) };
}

function draw(id, xs, names, ys, options = {}) {
  const box = document.getElementById(id);
  const width = Math.max(300, box.clientWidth - 32);
  const opts = {
    width, height: 220,
    scales: { x: { time: true } },
    axes: [{ stroke: "#6b7280" }, { stroke: "#6b7280", size: 60 }],
    series: [{}, ...names.map((name, i) => ({
      label: name, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
      points: { show: xs.length <= 48 },
      ...(options.dash && options.dash[i] ? { dash: [6, 4] } : {}) }))],
  };
  if (charts[id]) charts[id].destroy();
  box.querySelector(".u-wrap")?.remove();
  box.querySelector(".empty")?.remove();
  if (!ys.some((y) => y.some((v) => v))) {
    box.append(el("p", { class: "muted empty" }, "Nothing in this range."));
    delete charts[id];
    box.dataset.points = "0";
    return;
  }
  const holder = el("div", { class: "u-wrap" });
  box.append(holder);
  charts[id] = new uPlot(opts, [xs, ...ys], holder);
  box.dataset.points = String(ys.reduce((n, y) => n + y.filter((v) => v !== null && v !== 0).length, 0));
}

function stat(label, value) {
  return el("div", { class: "card stat" }, el("div", { class: "muted small" }, label), el("strong", {}, value));
}

function ms(value) {
  return value === null || value === undefined ? "–" : value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`;
}

async function load() {
  try {
    const [byModel, byKey, all] = await Promise.all([
      api(`/v0/usage?${query({ group: "model" })}`),
      api(`/v0/usage?${query({ group: "key" })}`),
      api(`/v0/usage?${query({})}`),
    ]);
    const t = all.total;
    totals.replaceChildren(
      stat("Requests", t.requests.toLocaleString()), stat("Errors", t.errors.toLocaleString()),
      stat("Tokens in", t.tokens_in.toLocaleString()), stat("Tokens out", t.tokens_out.toLocaleString()),
      stat("Latency p50 / p95", `${ms(t.latency_p50_ms)} / ${ms(t.latency_p95_ms)}`),
      stat("First token p50 / p95", `${ms(t.ttft_p50_ms)} / ${ms(t.ttft_p95_ms)}`));
    const tokens = (d) => d.tokens_in + d.tokens_out;
    for (const [id, source, group, value] of [
      ["chart-requests-model", byModel, "model", (d) => d.requests],
      ["chart-tokens-model", byModel, "model", tokens],
      ["chart-requests-key", byKey, "key", (d) => d.requests],
      ["chart-tokens-key", byKey, "key", tokens],
    ]) {
      const s = perGroup(source, group, value);
      draw(id, s.xs, s.names, s.ys);
    }
    const times = fields(all, ["latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "ttft_p95_ms"], null);
    draw("chart-latency", times.xs, ["latency p50", "latency p95", "first token p50", "first token p95"],
      times.ys, { dash: [false, true, false, true] });
    const errors = fields(all, ["errors"], 0);
    draw("chart-errors", errors.xs, ["errors"], errors.ys);
    summary.textContent = `${all.bucket === "day" ? "daily" : "hourly"} · updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    totals.replaceChildren(el("p", { class: "alert error" }, error.message));
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const params = new URLSearchParams();
  for (const [name, value] of new FormData(form)) if (value) params.set(name, value);
  history.replaceState(null, "", `?${params}`);
  load();
});
form.elements.range.addEventListener("change", load);
load();
setInterval(() => { if (!document.hidden) load(); }, REFRESH_MS);
