// API keys page: list, create (the key is shown once), revoke.
"use strict";

const list = document.getElementById("keys");
const created = document.getElementById("created");

async function loadKeys() {
  try {
    const data = await api("/api/keys");
    if (!data.keys.length) {
      list.replaceChildren(el("p", { class: "muted" }, "No API keys yet."));
      return;
    }
    list.replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, ["Name", "Key", "Scopes", "Created", "Last used", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, data.keys.map((k) => el("tr", { dataset: { keyId: k.id } },
        el("td", {}, k.name),
        el("td", { class: "id" }, `${k.prefix}…`),
        el("td", {}, k.scopes.join(", ")),
        el("td", {}, new Date(k.created_at * 1000).toLocaleString()),
        el("td", {}, k.last_used_at ? new Date(k.last_used_at * 1000).toLocaleString() : "never"),
        el("td", {}, k.revoked ? el("span", { class: "badge Error" }, "revoked")
          : el("button", { class: "btn danger small", onclick: () => revoke(k) }, "Revoke")))))));
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
    const key = await api("/api/keys", { method: "POST", body: { name: document.getElementById("key-name").value, scopes } });
    created.hidden = false;
    created.replaceChildren("New key (copy it now, it is not shown again): ", el("code", { id: "new-key-value" }, key.key));
    document.getElementById("key-name").value = "";
    loadKeys();
  } catch (error) {
    toast(error.message);
  }
});

loadKeys();
