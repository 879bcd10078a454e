// Requests page: the request history (GET /v0/requests) with filters, refreshed every 5 s.
"use strict";

const table = document.getElementById("requests");
const summary = document.getElementById("summary");
const filters = document.getElementById("filters");
const REFRESH_MS = 5000;

function ms(value) {
  if (value === null || value === undefined) return "–";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`;
}

// A key's or a model's usage over the last 24 hours, on the Usage page.
function usageLink(filter, text) {
  return el("a", { href: `/usage?${new URLSearchParams(filter)}`, title: "Usage" }, text);
}

function row(r) {
  const tokens = r.tokens_in === null && r.tokens_out === null ? "–" : `${r.tokens_in ?? "–"} → ${r.tokens_out ?? "–"}`;
  return el("tr", { dataset: { status: r.status } },
    el("td", { class: "small" }, new Date(r.at * 1000).toLocaleString()),
    el("td", {}, r.key_name ? usageLink({ key: r.key_name }, r.key_name) : "–"),
    el("td", {}, r.model ? usageLink({ model: r.model }, r.model) : "–", r.stream ? el("span", { class: "muted small" }, " stream") : null),
    el("td", {}, r.node || "–"),
    el("td", { "data-role": "status" }, el("span", { class: `badge ${r.status < 400 ? "online" : "offline"}`, title: r.error || "" }, String(r.status))),
    el("td", {}, ms(r.latency_ms)),
    el("td", {}, ms(r.ttft_ms)),
    el("td", {}, tokens));
}

async function load() {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData(filters)) if (value) params.set(name, value);
  params.set("limit", "200");
  try {
    const data = await api(`/v0/requests?${params}`);
    summary.textContent = `${data.data.length}${data.next_before_id ? "+" : ""} requests`;
    if (!data.data.length) {
      table.replaceChildren(el("p", { class: "muted" }, "No request matches."));
      return;
    }
    table.replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, ["Time", "Key", "Model", "Node", "Status", "Latency", "First token", "Tokens in → out"].map((h) => el("th", {}, h)))),
      el("tbody", {}, data.data.map(row))));
  } catch (error) {
    table.replaceChildren(el("p", { class: "alert error" }, error.message));
  }
}

filters.addEventListener("submit", (event) => { event.preventDefault(); load(); });
load();
setInterval(load, REFRESH_MS);
