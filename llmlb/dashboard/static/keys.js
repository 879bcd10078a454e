// API keys page: list (with each key's limits and their use now), create (the key is shown
// once, with its limits), change limits, revoke.
"use strict";

const list = document.getElementById("keys");
const created = document.getElementById("created");
const dialog = document.getElementById("edit-limits");
const LIMITS = [["rpm", "req/min"], ["tpm", "tokens/min"], ["max_concurrent", "at once"],
  ["daily_tokens", "tokens/day"], ["monthly_tokens", "tokens/month"]];

// The limit fields of a form: a number, or null (no limit); models as a list, or null.
function limitsOf(form) {
  const out = {};
  for (const [name] of LIMITS) {
    const value = form.elements[name].value.trim();
    out[name] = value ? Number(value) : null;
  }
  const models = form.elements.models.value.split(",").map((m) => m.trim()).filter(Boolean);
  out.models = models.length ? models : null;
  return out;
}

function limitsText(k) {
  const parts = LIMITS.filter(([name]) => k.limits[name] !== null)
    .map(([name, label]) => `${k.use[name] ?? 0}/${k.limits[name]} ${label}`);
  if (k.limits.models) parts.push(`models: ${k.limits.models.join(", ")}`);
  return parts.length ? parts.join(" · ") : "none";
}

function editLimits(key) {
  const form = document.getElementById("limits-form");
  document.getElementById("limits-key").textContent = key.name;
  for (const [name] of LIMITS) form.elements[name].value = key.limits[name] ?? "";
  form.elements.models.value = (key.limits.models || []).join(", ");
  dialog.onclose = async () => {
    if (dialog.returnValue !== "save") return;
    await api(`/api/keys/${key.id}`, { method: "PATCH", body: limitsOf(form) })
      .then(() => toast(`Limits of "${key.name}" saved`)).catch((e) => toast(e.message));
    loadKeys();
  };
  dialog.showModal();
}

async function loadKeys() {
  try {
    const data = await api("/api/keys");
    if (!data.keys.length) {
      list.replaceChildren(el("p", { class: "muted" }, "No API keys yet."));
      return;
    }
    list.replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, ["Name", "Key", "Scopes", "Limits (used now)", "Created", "Last used", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, data.keys.map((k) => el("tr", { dataset: { keyId: k.id } },
        el("td", {}, k.name),
        el("td", { class: "id" }, `${k.prefix}…`),
        el("td", {}, k.scopes.join(", ")),
        el("td", { class: "small", "data-role": "limits" }, limitsText(k)),
        el("td", {}, new Date(k.created_at * 1000).toLocaleString()),
        el("td", {}, k.last_used_at ? new Date(k.last_used_at * 1000).toLocaleString() : "never"),
        el("td", {}, k.revoked ? el("span", { class: "badge Error" }, "revoked")
          : [el("a", { class: "btn ghost small", href: `/usage?${new URLSearchParams({ key: k.name })}` }, "Usage"), " ",
            el("button", { class: "btn small", onclick: () => editLimits(k) }, "Limits…"), " ",
            el("button", { class: "btn danger small", onclick: () => revoke(k) }, "Revoke")]))))));
  } catch (error) {
    list.replaceChildren(el("p", { class: "alert error" }, error.message));
  }
}

async function revoke(key) {
  if (!confirm(`Revoke the key "${key.name}"? Clients using it stop working at once.`)) return;
  await api(`/api/keys/${key.id}`, { method: "DELETE" }).catch((e) => toast(e.message));
  loadKeys();
}

document.getElementById("new-key").addEventListener("submit", async (event) => {
  event.preventDefault();
  const scopes = [...document.querySelectorAll('input[name="scope"]:checked')].map((i) => i.value);
  try {
    const body = { name: document.getElementById("key-name").value, scopes, ...limitsOf(event.target) };
    const key = await api("/api/keys", { method: "POST", body });
    created.hidden = false;
    created.replaceChildren("New key (copy it now, it is not shown again): ", el("code", { id: "new-key-value" }, key.key));
    event.target.reset();
    loadKeys();
  } catch (error) {
    toast(error.message);
  }
});

loadKeys();
