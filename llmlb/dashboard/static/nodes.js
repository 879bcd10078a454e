// Nodes page: each node's and endpoint's status, hardware, memory, models and load, refreshed
// every 2 s; endpoints added and removed here.
"use strict";

const list = document.getElementById("nodes");
const summary = document.getElementById("summary");
const REFRESH_MS = 2000;

function ago(seconds) {
  if (seconds < 2) return "just now";
  if (seconds < 120) return `${Math.round(seconds)} s ago`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

function hardware(hw) {
  if (!hw) return el("span", { class: "muted" }, "–");
  if (hw.gpu_count) {
    const names = [...new Set(hw.gpus.map((g) => g.name))].join(", ");
    return el("div", {}, el("strong", {}, `${hw.gpu_count} × ${names}`),
      el("div", { class: "muted small" }, `${hw.cpu_count} CPUs · ${formatBytes(hw.memory_total_bytes)} RAM`));
  }
  return el("div", {}, el("strong", {}, `${hw.cpu_count} CPUs`),
    el("div", { class: "muted small" }, "no GPU"));
}

function memory(hw) {
  if (!hw) return el("span", { class: "muted" }, "–");
  const gpu = hw.gpu_count > 0;
  const total = gpu ? hw.vram_total_bytes : hw.memory_total_bytes;
  const used = total - (gpu ? hw.vram_free_bytes : hw.memory_free_bytes);
  return el("div", { class: "mem", "data-role": "memory" },
    el("meter", { min: 0, max: total, value: used, high: total * 0.9, "aria-label": gpu ? "VRAM in use" : "RAM in use" }),
    el("span", { class: "small" }, `${formatBytes(used)} / ${formatBytes(total)} ${gpu ? "VRAM" : "RAM"}`));
}

function models(n) {
  const ready = n.models.map((id) => el("span", { class: "tag" }, id));
  const loaded = (n.loaded || []).map((m) => m.id);
  const downloads = (n.downloads || []).map((d) => el("div", { class: "download", dataset: { modelId: d.model_id } },
    el("span", { class: "small" }, d.model_id),
    d.status === "error"
      ? el("span", { class: "error-text" }, d.error_message || "failed")
      : el("progress", { max: 100, value: Math.round((d.progress || 0) * 100) }),
    d.status === "error" ? null : el("span", { class: "pct" }, `${Math.round((d.progress || 0) * 100)}%`)));
  return el("div", { class: "node-models" },
    ready.length ? el("div", { class: "tags" }, ready) : el("span", { class: "muted small" }, "no model ready"),
    loaded.length ? el("div", { class: "muted small" }, `loaded: ${loaded.join(", ")}`) : null,
    downloads);
}

function row(n) {
  const endpoint = n.kind === "endpoint";
  const forget = endpoint
    ? el("button", { class: "btn small danger", "data-role": "remove", onclick: () => removeEndpoint(n.name) }, "Remove")
    : n.status === "offline" && n.id
      ? el("button", { class: "btn small danger", onclick: () => forgetNode(n.name) }, "Forget") : null;
  const provider = n.kind === "provider";
  const hw = endpoint
    ? el("div", {}, el("strong", {}, "endpoint"), el("div", { class: "muted small" },
      `load from ${n.load_source === "metrics" ? "its metrics" : "the balancer"}${n.has_api_key ? " · API key" : ""}`))
    : provider
      ? el("div", {}, el("strong", {}, "hosted provider"), el("div", { class: "muted small" }, `key from ${n.api_key_env}`))
      : hardware(n.hardware);
  return el("tr", { dataset: { nodeName: n.name, status: n.status } },
    el("td", {}, el("strong", {}, n.name), el("div", { class: "muted small" }, n.url || "in this process")),
    el("td", {}, el("span", { class: `badge ${n.status}`, "data-role": "status", title: n.last_error || "" }, n.status)),
    el("td", {}, hw),
    el("td", {}, endpoint || provider ? el("span", { class: "muted" }, "–") : memory(n.hardware)),
    el("td", {}, models(n)),
    el("td", { "data-role": "active", title: "in flight from this balancer · queued at the node" },
      `${Math.max(n.in_flight, n.active_requests)} active`, n.queued_requests ? ` · ${n.queued_requests} queued` : ""),
    el("td", { "data-role": "heartbeat", title: n.last_check_error || "" }, n.url ? ago(n.seconds_since_heartbeat) : "–"),
    el("td", {}, forget));
}

async function load() {
  try {
    const data = await api("/v0/nodes");
    const online = data.data.filter((n) => n.status === "online").length;
    summary.textContent = `${online} of ${data.data.length} online`;
    if (!data.data.length) {
      list.replaceChildren(el("p", { class: "muted" }, "No node has registered yet."));
      return;
    }
    list.replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, ["Node", "Status", "Hardware", "Memory", "Models", "Requests", "Last heartbeat", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, data.data.map(row))));
  } catch (error) {
    list.replaceChildren(el("p", { class: "alert error" }, error.message));
  }
}

async function forgetNode(name) {
  if (!confirm(`Forget the node "${name}"? It appears again when it next registers.`)) return;
  await api(`/v0/nodes/${encodeURIComponent(name)}`, { method: "DELETE" }).catch((e) => toast(e.message));
  load();
}

async function removeEndpoint(name) {
  if (!confirm(`Remove the endpoint "${name}"? Its models are no longer served through llmlb.`)) return;
  await api(`/v0/endpoints/${encodeURIComponent(name)}`, { method: "DELETE" }).catch((e) => toast(e.message));
  load();
}

document.getElementById("new-endpoint").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = { name: form.querySelector("#endpoint-name").value.trim(),
    base_url: form.querySelector("#endpoint-url").value.trim() };
  const key = form.querySelector("#endpoint-key").value;
  const keyEnv = form.querySelector("#endpoint-key-env").value.trim();
  if (key) body.api_key = key;
  if (keyEnv) body.api_key_env = keyEnv;
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const added = await api("/v0/endpoints", { method: "POST", body });
    toast(`Added ${added.name}: ${added.models.length} models`);
    form.reset();
  } catch (error) {
    toast(error.message, 6000);
  } finally {
    button.disabled = false;
  }
  load();
});

// Aliases: a name agents use standing for a list of models (AG-5).
async function loadAliases() {
  const box = document.getElementById("aliases");
  try {
    const data = await api("/v0/aliases");
    if (!data.data.length) {
      box.replaceChildren(el("p", { class: "muted" }, "No aliases."));
      return;
    }
    box.replaceChildren(el("table", {}, el("tbody", {}, data.data.map((a) =>
      el("tr", { dataset: { alias: a.name } },
        el("td", {}, el("code", {}, a.name)),
        el("td", {}, a.models.join(" → ")),
        el("td", {}, el("button", { class: "btn small", type: "button",
          onclick: () => removeAlias(a.name) }, "Remove")))))));
  } catch (error) {
    box.replaceChildren(el("p", { class: "alert error" }, error.message));
  }
}

async function removeAlias(name) {
  await api(`/v0/aliases/${encodeURIComponent(name)}`, { method: "DELETE" }).catch((e) => toast(e.message));
  loadAliases();
}

document.getElementById("new-alias").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const name = form.querySelector("#alias-name").value.trim();
  const models = form.querySelector("#alias-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  try {
    const set = await api(`/v0/aliases/${encodeURIComponent(name)}`, { method: "PUT", body: { models } });
    toast(`${set.name} → ${set.models.join(", ")}`);
    form.reset();
  } catch (error) {
    toast(error.message, 6000);
  }
  loadAliases();
});

load();
loadAliases();
setInterval(load, REFRESH_MS);
