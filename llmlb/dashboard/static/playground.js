// Playground: chat with a ready model through /v1/chat/completions, streamed.
"use strict";

const modelSelect = document.getElementById("model");
const transcript = document.getElementById("transcript");
const promptBox = document.getElementById("prompt");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const usageLine = document.getElementById("usage");
const temperature = document.getElementById("temperature");
const history = [];
let controller = null;

temperature.addEventListener("input", () => {
  document.getElementById("temp-out").textContent = temperature.value;
});

async function loadModels() {
  const wanted = new URLSearchParams(location.search).get("model");
  try {
    const data = await api("/v1/models");
    const ids = data.data.map((m) => m.id);
    modelSelect.replaceChildren(...ids.map((id) => el("option", { value: id, selected: id === wanted }, id)));
    if (!ids.length) {
      modelSelect.replaceChildren(el("option", { value: "" }, "No ready model: pull one first"));
      sendButton.disabled = true;
    }
  } catch (error) {
    toast(error.message);
  }
}

function bubble(role, text) {
  transcript.querySelector(".empty")?.remove();
  const node = el("div", { class: `msg ${role}` }, text);
  transcript.append(node);
  transcript.scrollTop = transcript.scrollHeight;
  return node;
}

async function send(event) {
  event.preventDefault();
  const text = promptBox.value.trim();
  if (!text || !modelSelect.value) return;
  promptBox.value = "";
  history.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  answer.classList.add("streaming");
  const system = document.getElementById("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : [...history];
  controller = new AbortController();
  sendButton.hidden = true;
  stopButton.hidden = false;
  usageLine.textContent = "";
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", credentials: "same-origin", signal: controller.signal,
      headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF },
      body: JSON.stringify({
        model: modelSelect.value, messages, stream: true,
        stream_options: { include_usage: true },
        temperature: Number(temperature.value),
        max_tokens: Number(document.getElementById("max-tokens").value) || 256,
      }),
    });
    if (!response.ok) {
      const data = await response.json().catch(() => null);
      throw new Error(data?.error?.message || `${response.status} ${response.statusText}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const raw of events) {
        const line = raw.trim();
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") continue;
        const chunk = JSON.parse(payload);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          reply += delta;
          answer.textContent = reply;
          transcript.scrollTop = transcript.scrollHeight;
        }
        if (chunk.usage) {
          usageLine.textContent = `${chunk.usage.prompt_tokens} prompt + ${chunk.usage.completion_tokens} completion tokens`;
        }
      }
    }
    history.push({ role: "assistant", content: reply });
  } catch (error) {
    if (error.name === "AbortError") {
      history.push({ role: "assistant", content: reply });
      usageLine.textContent = "Stopped.";
    } else {
      answer.remove();
      bubble("error", error.message);
      history.pop();
    }
  } finally {
    answer.classList.remove("streaming");
    answer.dataset.done = "true";
    sendButton.hidden = false;
    stopButton.hidden = true;
    controller = null;
  }
}

document.getElementById("composer").addEventListener("submit", send);
promptBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    document.getElementById("composer").requestSubmit();
  }
});
stopButton.addEventListener("click", () => controller?.abort());
document.getElementById("clear").addEventListener("click", () => {
  history.length = 0;
  transcript.replaceChildren(el("p", { class: "muted empty" }, "Cleared. Say hello again."));
  usageLine.textContent = "";
});

loadModels();
