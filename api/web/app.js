// The chat page. Conversations are listed from this browser's localStorage; the server keeps their
// history. Model text only ever reaches the page as text nodes, never as markup.
"use strict";

const LIST = "chat-api.conversations"; // [{id, title}], newest first
const CURRENT = "chat-api.current";
const KEY = "chat-api.key"; // sessionStorage: forgotten when the tab closes

const $ = (id) => document.getElementById(id);
const ui = {
  list: $("conversations"),
  log: $("log"),
  form: $("composer"),
  input: $("message"),
  send: $("send"),
  stop: $("stop"),
  regenerate: $("regenerate"),
  status: $("status"),
  keyBox: $("key-box"),
  key: $("key"),
  newButton: $("new"),
};

let conversations = loadList();
let current = localStorage.getItem(CURRENT);
let inFlight = null; // the AbortController of the turn under way
let waitUntil = 0; // after a 429 or 503, no turn before this time (ms)
let countdown = null;
let stoppedAt = 0; // a reply stopped or cut a moment ago may hold its conversation's lock a little longer

class ApiError extends Error {
  constructor(status, type, message, retryAfter) {
    super(message);
    this.status = status;
    this.type = type;
    this.retryAfter = retryAfter;
  }
}

function loadList() {
  try {
    const list = JSON.parse(localStorage.getItem(LIST) || "[]");
    return Array.isArray(list) ? list.filter((c) => c && typeof c.id === "string") : [];
  } catch {
    return [];
  }
}

function saveList() {
  localStorage.setItem(LIST, JSON.stringify(conversations));
  if (current) localStorage.setItem(CURRENT, current);
}

function request(method, path, body, signal) {
  const headers = {};
  if (method === "POST") headers["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY);
  if (key) headers["Authorization"] = "Bearer " + key;
  // Relative paths, so that the page works behind a proxy that serves the API under a prefix.
  return fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
}

async function failure(response) {
  let type = "http_error";
  let message = response.statusText || "the request failed";
  try {
    const body = await response.json();
    if (body && body.error) ({ type, message } = body.error);
  } catch {
    // Not the API's error shape (a proxy's page, say): the status says enough.
  }
  const retry = parseInt(response.headers.get("Retry-After") || "", 10);
  return new ApiError(response.status, type, message, Number.isFinite(retry) ? retry : null);
}

function say(text, kind = "info") {
  ui.status.textContent = text;
  ui.status.className = kind;
}

function showError(error) {
  if (!(error instanceof ApiError)) {
    say("Could not reach the server: " + error.message, "error");
  } else if (error.status === 401) {
    ui.keyBox.hidden = false;
    ui.key.focus();
    say(sessionStorage.getItem(KEY) ? "The API key was refused: " + error.message : "This API needs a key: enter it on the left.", "error");
  } else if (error.status === 429 || error.status === 503) {
    const what = error.status === 429 ? "Too many requests" : "The service is unavailable";
    wait(`${what} (${error.message}).`, error.retryAfter ?? 5);
  } else if (error.status === 409) {
    say("This conversation is busy with another reply (in another tab?). Send again once it has finished.", "error");
  } else {
    say(`Error ${error.status} (${error.type}): ${error.message}`, "error");
  }
}

function wait(text, seconds) {
  clearInterval(countdown);
  waitUntil = Date.now() + seconds * 1000;
  const tick = () => {
    const left = Math.ceil((waitUntil - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(countdown);
      countdown = null;
      say("You can send again.");
      refresh();
    } else {
      say(`${text} Try again in ${left} s.`, "error");
    }
  };
  tick();
  countdown = setInterval(tick, 250);
  refresh();
}

function refresh() {
  const busy = inFlight !== null;
  const waiting = Date.now() < waitUntil;
  ui.send.disabled = busy || waiting;
  ui.stop.hidden = !busy;
  ui.regenerate.disabled = busy || waiting || !ui.log.querySelector(".message.assistant");
  ui.newButton.disabled = busy;
  for (const button of ui.list.querySelectorAll("button")) button.disabled = busy;
}

function renderList() {
  ui.list.replaceChildren(
    ...conversations.map((c) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = c.title || "New conversation";
      button.title = c.id;
      button.setAttribute("aria-current", String(c.id === current));
      button.addEventListener("click", () => select(c.id));
      const item = document.createElement("li");
      item.append(button);
      return item;
    }),
  );
  refresh();
}

function bubble(role, text) {
  const item = document.createElement("div");
  item.className = "message " + role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(body);
  ui.log.append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function note(item, text) {
  const line = document.createElement("div");
  line.className = "note";
  line.textContent = text;
  item.append(line);
  item.classList.add("incomplete");
}

async function showHistory(id) {
  ui.log.replaceChildren();
  const response = await request("GET", `chat/${encodeURIComponent(id)}/messages`);
  if (id !== current) return; // another conversation was chosen meanwhile
  if (response.status === 404) {
    say("This conversation is no longer on the server (it expired or was deleted).", "error");
  } else if (!response.ok) {
    showError(await failure(response));
  } else {
    const { messages } = await response.json();
    for (const m of messages) bubble(m.role === "user" ? "user" : "assistant", m.content);
    say("");
  }
  refresh();
}

async function select(id) {
  current = id;
  saveList();
  renderList();
  try {
    await showHistory(id);
  } catch (error) {
    showError(error);
  }
}

async function newConversation() {
  const response = await request("POST", "sessions");
  if (!response.ok) throw await failure(response);
  const { session_id } = await response.json();
  conversations.unshift({ id: session_id, title: "" });
  await select(session_id);
}

function entitle(text) {
  const entry = conversations.find((c) => c.id === current);
  if (entry && !entry.title) {
    entry.title = text.length > 40 ? text.slice(0, 39) + "\u2026" : text;
    saveList();
    renderList();
  }
}

async function postTurn(body, signal) {
  for (let attempt = 0; ; attempt++) {
    const response = await request("POST", `chat/${encodeURIComponent(current)}/stream`, body, signal);
    if (response.status !== 409 || Date.now() - stoppedAt > 5000 || attempt >= 15) return response;
    // The server lets go of a stopped reply's lock once it notices the closed connection: soon.
    await response.body?.cancel();
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

// Streams one reply into a new bubble. Returns "done", "stopped", "cut", or "failed" (nothing began).
async function turn(body, text) {
  const controller = new AbortController();
  inFlight = controller;
  refresh();
  say("");
  const asked = text === null ? null : bubble("user", text);
  const reply = bubble("assistant", "");
  reply.classList.add("streaming");
  const content = reply.querySelector(".text");
  try {
    const response = await postTurn(body, controller.signal);
    if (!response.ok) throw await failure(response);
    // Read the body itself and decode here: through a TextDecoderStream, a cut would error the
    // decoder's side too and drop the text it had decoded but not yet handed over.
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) {
          content.append(decoder.decode());
          return "done";
        }
        content.append(decoder.decode(value, { stream: true }));
        reply.scrollIntoView({ block: "end" });
      }
    } catch {
      // A reply cut short ends with a network error rather than a clean end: never mistake it for whole.
      stoppedAt = Date.now();
      if (controller.signal.aborted) {
        note(reply, "Stopped: this turn was not saved.");
        return "stopped";
      }
      note(reply, "Incomplete: the reply was cut short and this turn was not saved. Send it again.");
      return "cut";
    }
  } catch (error) {
    reply.remove();
    asked?.remove();
    if (error.name !== "AbortError") showError(error);
    return "failed";
  } finally {
    reply.classList.remove("streaming");
    inFlight = null;
    refresh();
  }
}

async function send() {
  const text = ui.input.value;
  if (!text.trim() || inFlight || Date.now() < waitUntil) return;
  try {
    if (!current || !conversations.some((c) => c.id === current)) await newConversation();
  } catch (error) {
    showError(error);
    return;
  }
  ui.input.value = "";
  const end = await turn({ message: text }, text);
  if (end === "done") entitle(text);
  if ((end === "failed" || end === "cut") && !ui.input.value) ui.input.value = text;
}

async function regenerate() {
  if (!current || inFlight) return;
  try {
    // Start from what the server holds, whatever the page showed (a stopped turn, say).
    await showHistory(current);
    const last = ui.log.lastElementChild;
    if (!last || !last.classList.contains("assistant")) return;
    last.remove();
    if ((await turn({ regenerate: true }, null)) === "failed") await showHistory(current);
  } catch (error) {
    showError(error);
  }
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", () => inFlight?.abort());
ui.regenerate.addEventListener("click", regenerate);
ui.newButton.addEventListener("click", () => newConversation().catch(showError));
ui.key.addEventListener("change", () => {
  const key = ui.key.value.trim();
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
  say(key ? "Key saved for this tab." : "");
  if (current) select(current);
});

if (sessionStorage.getItem(KEY)) {
  ui.keyBox.hidden = false;
  ui.key.value = sessionStorage.getItem(KEY);
}
renderList();
if (current && conversations.some((c) => c.id === current)) select(current);
else if (conversations.length) select(conversations[0].id);
