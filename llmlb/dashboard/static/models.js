// Models page: the Model Hub (catalog cards, Pull, live progress, Retry) and the Local tab.
"use strict";

const state = { models: new Map(), filter: "", socket: null, pollTimer: null };
const cards = document.getElementById("cards");
const localBox = document.getElementById("local");
const live = document.getElementById("live");

// --- tabs -----------------------------------------------------------------------------------
function showTab(name, remember = true) {
  for (const tab of document.querySelectorAll(".tab")) {
    const active = tab.dataset.tab === name;
    tab.classList.toggle("active", active);
    tab.setAttribute("aria-selected", String(active));
  }
  document.getElementById("panel-hub").hidden = name !== "hub";
  document.getElementById("panel-local").hidden = name !== "local";
  if (name === "local") loadLocal();
  if (remember) history.replaceState(null, "", name === "local" ? "#local" : "#hub");
}
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => showTab(tab.dataset.tab));
}

// --- the hub --------------------------------------------------------------------------------
async function loadHub() {
  try {
    const data = await api("/api/models");
    state.models = new Map(data.models.map((item) => [item.model.id, item]));
    renderCards();
  } catch (error) {
    cards.replaceChildren(el("p", { class: "alert error" }, `Could not load the catalog: ${error.message}`));
  }
}

function matches(item) {
  if (!state.filter) return true;
  const m = item.model;
  const text = [m.id, m.name, m.repo, m.description, ...(m.tags || [])].join(" ").toLowerCase();
  return text.includes(state.filter);
}

function renderCards() {
  const items = [...state.models.values()].filter(matches);
  if (!items.length) {
    cards.replaceChildren(el("p", { class: "muted" }, state.models.size ? "No model matches." : "The catalog is empty."));
    return;
  }
  cards.replaceChildren(...items.map(card));
}

function card(item) {
  const m = item.model;
  const stats = item.hf_stats
    ? el("span", { title: "Hugging Face downloads and likes" }, `↓ ${item.hf_stats.downloads?.toLocaleString() ?? "–"} · ★ ${item.hf_stats.stars ?? "–"}`)
    : null;
  return el("article", { class: "card model-card", dataset: { modelId: m.id, status: item.status } },
    el("header", {},
      el("div", {}, el("h2", {}, m.name), el("div", { class: "id" }, m.id)),
      el("span", { class: `badge ${item.status}`, "data-role": "status" }, item.status)),
    el("p", { class: "desc" }, m.description || m.repo),
    el("div", { class: "facts" },
      el("span", {}, formatBytes(m.size_bytes)),
      m.quantization ? el("span", {}, m.quantization) : null,
      el("span", { title: "Memory needed" }, `needs ${formatBytes(m.required_memory_bytes)}`),
      item.available_nodes ? el("span", { "data-role": "nodes" }, `on ${(item.nodes || []).join(", ") || `${item.available_nodes} nodes`}`) : null,
      stats),
    el("div", { class: "tags" }, (m.tags || []).map((t) => el("span", { class: "tag" }, t))),
    actions(item));
}

function actions(item) {
  const id = item.model.id;
  switch (item.status) {
    case "Available":
      return el("div", { class: "actions" }, el("button", { class: "btn primary", onclick: () => pull(id) }, "Pull"));
    case "Registered":
      return el("div", { class: "actions" }, el("span", { class: "muted small" }, "Queued: waiting for the download to start…"));
    case "Downloading": {
      const pct = Math.round((item.progress || 0) * 100);
      return el("div", { class: "actions" },
        el("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct },
          el("div", { class: "bar", style: `width: ${pct}%` })),
        el("span", { class: "pct" }, `${pct}%`));
    }
    case "Ready":
      return el("div", { class: "actions" },
        el("span", { class: "muted small" }, "✓ Ready to serve"),
        el("a", { class: "btn small", href: `/playground?model=${encodeURIComponent(id)}` }, "Try it"));
    case "Error":
      return el("div", { class: "actions stacked" },
        el("p", { class: "error-text" }, item.error || "The download failed."),
        el("button", { class: "btn", onclick: () => pull(id) }, "Retry"));
    default:
      return el("div", { class: "actions" });
  }
}

function update(id, changes) {
  const item = state.models.get(id);
  if (!item) return;
  Object.assign(item, changes);
  const old = cards.querySelector(`[data-model-id="${CSS.escape(id)}"]`);
  if (old) old.replaceWith(card(item));
}

async function pull(id) {
  update(id, { status: "Registered", error: null });
  try {
    const result = await api("/api/models/register", { method: "POST", body: { model_id: id } });
    update(id, { status: result.status });
    toast(`Pulling ${id}…`);
  } catch (error) {
    update(id, { status: "Error", error: error.message });
    toast(error.message, 6000);
  }
}

document.getElementById("filter").addEventListener("input", (event) => {
  state.filter = event.target.value.trim().toLowerCase();
  renderCards();
});

// --- live updates ---------------------------------------------------------------------------
function connect(delay = 1000) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws/models`);
  state.socket = socket;
  socket.addEventListener("open", () => {
    live.className = "live small on";
    live.textContent = "● live";
    clearInterval(state.pollTimer);
    loadHub();  // anything missed while connecting
    delay = 1000;
  });
  socket.addEventListener("message", (message) => {
    const event = JSON.parse(message.data);
    if (event.type !== "ModelStatusChanged") return;
    update(event.model_id, { status: event.status, progress: event.progress ?? null });
    if (["Ready", "Error", "Available"].includes(event.status)) {
      loadHub();  // error texts, node counts
      if (!document.getElementById("panel-local").hidden) loadLocal();
    }
  });
  socket.addEventListener("close", () => {
    live.className = "live small off";
    live.textContent = "○ reconnecting";
    clearInterval(state.pollTimer);
    state.pollTimer = setInterval(loadHub, 3000);  // keep moving without the socket
    setTimeout(() => connect(Math.min(delay * 2, 15000)), delay);
  });
}

// --- the Local tab --------------------------------------------------------------------------
async function loadLocal() {
  try {
    const data = await api("/api/models/local");
    if (!data.models.length) {
      localBox.replaceChildren(el("div", { class: "card" }, el("p", { class: "muted" },
        "No model on disk yet. Pull one from the Model Hub, or copy a model directory into the models folder.")));
      return;
    }
    const rows = data.models.map((m) => el("tr", { dataset: { modelId: m.id } },
      el("td", {}, el("strong", {}, m.id), m.in_catalog ? null : el("span", { class: "muted small" }, " (added by hand)")),
      el("td", {}, m.format),
      el("td", {}, formatBytes(m.size_bytes)),
      el("td", {}, m.owned_by),
      el("td", {}, m.deletable
        ? el("button", { class: "btn danger small", onclick: () => remove(m.id) }, "Delete")
        : el("span", { class: "muted small", title: "Copies on the shared path are never deleted" }, "shared"))));
    localBox.replaceChildren(el("div", { class: "card" }, el("table", {},
      el("thead", {}, el("tr", {}, ["Model", "Format", "Size", "Source", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows))));
  } catch (error) {
    localBox.replaceChildren(el("p", { class: "alert error" }, error.message));
  }
}

async function remove(id) {
  if (!confirm(`Delete the local copy of ${id}? It can be pulled again later.`)) return;
  try {
    await api(`/api/models/${encodeURIComponent(id).replace(/%2F/g, "/")}`, { method: "DELETE" });
    toast(`Deleted ${id}`);
  } catch (error) {
    toast(error.message, 6000);
  }
  loadLocal();
  loadHub();
}

showTab(location.hash === "#local" ? "local" : "hub", false);
loadHub();
connect();
