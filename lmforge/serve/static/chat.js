// The chat page of `lmforge serve`: plain JavaScript, no build step, no dependencies.
//
// Talks to the server's OpenAI-compatible API (GET v1/models, POST v1/chat/completions with
// stream: true) and keeps every conversation in this browser's localStorage. Text from the model
// and from the user is only ever put into the page as text (textContent / text nodes), never as
// HTML, so a reply that contains markup shows the markup and runs nothing.
"use strict";

(() => {
  const STORE_CHATS = "lmforge.chats.v1";
  const STORE_SETTINGS = "lmforge.settings.v1";
  const STORE_API_KEY = "lmforge.apiKey";
  const SAVE_EVERY_MS = 1000; // while a reply streams in, save it at most this often

  const $ = (id) => document.getElementById(id);
  const ui = {
    app: $("app"),
    toggleSidebar: $("toggle-sidebar"),
    modelName: $("model-name"),
    newChat: $("new-chat"),
    chatList: $("chat-list"),
    system: $("system"),
    temperature: $("temperature"),
    maxTokens: $("max-tokens"),
    apiKey: $("api-key"),
    messages: $("messages"),
    empty: $("empty"),
    error: $("error"),
    composer: $("composer"),
    input: $("input"),
    send: $("send"),
    stop: $("stop"),
    status: $("status"),
  };

  // -- storage -----------------------------------------------------------------------------
  function readJson(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch (e) {
      return fallback;
    }
  }

  function writeJson(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (e) {
      showError("Could not save in this browser's storage (" + e.message + "); the conversation will not survive a reload.");
    }
  }

  const ROLES = ["user", "assistant"];

  // Stored data may come from an older page or be edited by hand: keep what is well formed.
  function cleanChats(stored) {
    const chats = [];
    const list = stored && Array.isArray(stored.chats) ? stored.chats : [];
    for (const c of list) {
      if (!c || typeof c.id !== "string" || !Array.isArray(c.messages)) continue;
      const messages = c.messages.filter((m) => m && ROLES.includes(m.role) && typeof m.content === "string");
      chats.push({
        id: c.id,
        title: typeof c.title === "string" ? c.title : "",
        updated: typeof c.updated === "number" ? c.updated : 0,
        messages: messages.map((m) => ({ role: m.role, content: m.content, note: typeof m.note === "string" ? m.note : "" })),
      });
    }
    const currentId = stored && chats.some((c) => c.id === stored.currentId) ? stored.currentId : null;
    return { chats, currentId };
  }

  let state = cleanChats(readJson(STORE_CHATS, null));
  const saveChats = () => writeJson(STORE_CHATS, state);

  const settings = Object.assign({ system: "", temperature: "0.7", maxTokens: "512" }, readJson(STORE_SETTINGS, {}));
  const saveSettings = () => writeJson(STORE_SETTINGS, settings);

  function currentChat() {
    return state.chats.find((c) => c.id === state.currentId) || null;
  }

  function newId() {
    return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 8);
  }

  function titleFor(text) {
    const line = text.trim().replace(/\s+/g, " ");
    return line.length > 48 ? line.slice(0, 47) + "\u2026" : line || "New chat";
  }

  // -- server ------------------------------------------------------------------------------
  let model = null; // {id, max_model_len} from v1/models

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = ui.apiKey.value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // The message of an OpenAI-style error body ({"error": {"message": ...}}) or of plain text.
  async function errorFromResponse(resp) {
    let detail = "";
    try {
      const text = await resp.text();
      try {
        const body = JSON.parse(text);
        const err = body && body.error;
        detail = (err && (typeof err === "string" ? err : err.message)) || (body && body.detail) || text;
        if (typeof detail !== "string") detail = JSON.stringify(detail);
      } catch (e) {
        detail = text;
      }
    } catch (e) {
      detail = "";
    }
    detail = detail.trim().slice(0, 500);
    const what = "HTTP " + resp.status + (resp.statusText ? " " + resp.statusText : "");
    if (resp.status === 401) {
      return new ApiError(
        "The server needs an API key (" + what + (detail ? ": " + detail : "") + "). " +
          "Enter it under Settings \u2192 API key, then send again.",
        401,
      );
    }
    return new ApiError("The server answered " + what + (detail ? ": " + detail : ""), resp.status);
  }

  function networkError(e) {
    return new ApiError("Could not reach the server (" + (e && e.message ? e.message : e) + ").", 0);
  }

  async function loadModels() {
    let resp;
    try {
      resp = await fetch("v1/models", { headers: headers(false) });
    } catch (e) {
      throw networkError(e);
    }
    if (!resp.ok) throw await errorFromResponse(resp);
    const body = await resp.json();
    const first = body && Array.isArray(body.data) ? body.data[0] : null;
    if (!first || typeof first.id !== "string") throw new ApiError("The server lists no model.", resp.status);
    model = { id: first.id, maxLen: Number.isInteger(first.max_model_len) ? first.max_model_len : null };
    ui.modelName.textContent = model.id;
    ui.modelName.title = model.id;
    document.title = model.id + " \u2013 lmforge chat";
    if (model.maxLen) {
      ui.maxTokens.max = String(model.maxLen);
      ui.modelName.title = model.id + " (context: " + model.maxLen + " tokens)";
      if (Number(ui.maxTokens.value) >= model.maxLen) {
        // Room for the prompt: the reply and the conversation share the model's context.
        ui.maxTokens.value = String(Math.max(1, Math.floor(model.maxLen / 2)));
        settings.maxTokens = ui.maxTokens.value;
        saveSettings();
      }
    }
    if (ui.apiKey.classList.contains("needs-attention")) {
      ui.apiKey.classList.remove("needs-attention"); // the key works now: the menu opened for it may close
      closeSidebarOnNarrow();
    }
    return model;
  }

  async function refreshModel() {
    try {
      await loadModels();
      clearError();
    } catch (e) {
      model = null;
      ui.modelName.textContent = "unavailable";
      showApiError(e);
    }
  }

  // Server-sent events: "field: value" lines, an event ends at a blank line. Network chunks
  // split the stream anywhere (inside a line, between \r and \n, inside a UTF-8 character:
  // the TextDecoder in stream mode keeps those bytes), so only whole lines are taken.
  class SSEParser {
    constructor(onEvent) {
      this.onEvent = onEvent;
      this.buffer = "";
      this.data = [];
      this.event = "";
    }

    push(text) {
      this.buffer += text;
      for (;;) {
        const m = /\r\n|\r|\n/.exec(this.buffer);
        if (!m) break;
        // A lone \r at the end may be the first half of \r\n: wait for the next chunk.
        if (m[0] === "\r" && m.index === this.buffer.length - 1) break;
        const line = this.buffer.slice(0, m.index);
        this.buffer = this.buffer.slice(m.index + m[0].length);
        this.line(line);
      }
    }

    end() {
      if (this.buffer) this.line(this.buffer.replace(/\r$/, ""));
      this.buffer = "";
      this.line(""); // a last event the server did not close with a blank line
    }

    line(line) {
      if (line === "") {
        if (this.data.length) {
          const data = this.data.join("\n");
          const event = this.event;
          this.data = [];
          this.event = "";
          this.onEvent(data, event);
        }
        this.event = "";
        return;
      }
      if (line.startsWith(":")) return; // a comment (keep-alive)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.data.push(value);
      else if (field === "event") this.event = value;
    }
  }

  // -- rendering ---------------------------------------------------------------------------
  const NOTES = {
    stopped: "Stopped",
    length: "Cut off: max tokens reached",
    error: "Interrupted by an error",
  };

  // One turn: a role label, the text (div.msg.user / div.msg.assistant: nothing but the text)
  // and, for replies, a note and a copy button.
  function renderTurn(message) {
    const turn = document.createElement("div");
    turn.className = "turn " + message.role;

    const role = document.createElement("div");
    role.className = "role";
    role.textContent = message.role === "user" ? "You" : "Assistant";
    turn.appendChild(role);

    const body = document.createElement("div");
    body.className = "msg " + message.role;
    const text = document.createTextNode(message.content);
    body.appendChild(text);
    turn.appendChild(body);

    const meta = document.createElement("div");
    meta.className = "meta";
    const note = document.createElement("span");
    note.className = "note";
    meta.appendChild(note);
    if (message.role === "assistant") {
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "copy";
      copy.textContent = "Copy";
      copy.setAttribute("aria-label", "Copy reply");
      copy.addEventListener("click", () => copyText(message.content, copy));
      meta.appendChild(copy);
    }
    turn.appendChild(meta);

    const view = { turn, body, text, note };
    setNote(view, message.note);
    return view;
  }

  function setNote(view, note) {
    view.note.textContent = note ? NOTES[note] || note : "";
    view.turn.classList.toggle("has-note", Boolean(note));
  }

  function nearBottom() {
    const el = document.scrollingElement || document.documentElement;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
  }

  function scrollToBottom() {
    const el = document.scrollingElement || document.documentElement;
    el.scrollTop = el.scrollHeight;
  }

  function renderMessages() {
    const chat = currentChat();
    ui.messages.replaceChildren();
    const views = [];
    for (const m of chat ? chat.messages : []) {
      const view = renderTurn(m);
      ui.messages.appendChild(view.turn);
      views.push(view);
    }
    ui.empty.hidden = views.length > 0;
    scrollToBottom();
    return views;
  }

  function renderChatList() {
    ui.chatList.replaceChildren();
    const chats = [...state.chats].sort((a, b) => b.updated - a.updated);
    for (const chat of chats) {
      const li = document.createElement("li");
      const open = document.createElement("button");
      open.type = "button";
      open.className = "chat-item";
      open.textContent = chat.title || "New chat";
      open.title = chat.title || "New chat";
      if (chat.id === state.currentId) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => selectChat(chat.id));
      const del = document.createElement("button");
      del.type = "button";
      del.className = "chat-delete";
      del.textContent = "Delete";
      del.setAttribute("aria-label", "Delete chat: " + (chat.title || "New chat"));
      del.addEventListener("click", () => deleteChat(chat.id));
      li.append(open, del);
      ui.chatList.appendChild(li);
    }
  }

  function render() {
    const views = renderMessages();
    renderChatList();
    return views;
  }

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = false;
  }

  function showApiError(e) {
    showError(e && e.message ? e.message : String(e));
    if (e && e.status === 401) {
      ui.apiKey.classList.add("needs-attention");
      ui.app.classList.add("sidebar-open");
      ui.toggleSidebar.setAttribute("aria-expanded", "true");
    }
  }

  function clearError() {
    ui.error.hidden = true;
    ui.error.textContent = "";
  }

  function setStatus(text) {
    ui.status.textContent = text;
  }

  async function copyText(text, button) {
    let ok = false;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        ok = true;
      }
    } catch (e) {
      ok = false;
    }
    if (!ok) {
      // Pages served over plain http (not localhost) have no async clipboard.
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "offscreen";
      document.body.appendChild(area);
      area.select();
      try {
        ok = document.execCommand("copy");
      } catch (e) {
        ok = false;
      }
      area.remove();
    }
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => {
      button.textContent = "Copy";
    }, 1500);
  }

  // -- chats -------------------------------------------------------------------------------
  let streaming = null; // {controller, stopped} while a reply streams in

  function selectChat(id) {
    if (streaming) stopStreaming();
    state.currentId = id;
    saveChats();
    clearError();
    setStatus("");
    render();
    closeSidebarOnNarrow();
    ui.input.focus();
  }

  function newChat() {
    if (streaming) stopStreaming();
    state.currentId = null; // the chat is created (and listed) with its first message
    saveChats();
    clearError();
    setStatus("");
    render();
    closeSidebarOnNarrow();
    ui.input.focus();
  }

  function deleteChat(id) {
    const chat = state.chats.find((c) => c.id === id);
    if (!chat) return;
    if (!window.confirm("Delete the chat \u201c" + (chat.title || "New chat") + "\u201d?")) return;
    if (streaming && id === state.currentId) stopStreaming();
    state.chats = state.chats.filter((c) => c.id !== id);
    if (state.currentId === id) state.currentId = null;
    saveChats();
    render();
  }

  function closeSidebarOnNarrow() {
    ui.app.classList.remove("sidebar-open");
    ui.toggleSidebar.setAttribute("aria-expanded", "false");
  }

  // -- sending -----------------------------------------------------------------------------
  function readParams() {
    const temperature = Number(ui.temperature.value);
    if (ui.temperature.value.trim() === "" || !Number.isFinite(temperature) || temperature < 0 || temperature > 2) {
      throw new ApiError("Temperature must be a number from 0 to 2.", 0);
    }
    const maxTokens = Number(ui.maxTokens.value);
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      throw new ApiError("Max tokens must be a whole number of at least 1.", 0);
    }
    if (model && model.maxLen && maxTokens >= model.maxLen) {
      throw new ApiError("Max tokens must be below the model's context of " + model.maxLen + " tokens (the conversation needs room too).", 0);
    }
    return { temperature, maxTokens };
  }

  function setStreamingUi(on) {
    ui.send.disabled = on;
    ui.stop.disabled = !on;
    ui.app.classList.toggle("streaming", on);
  }

  function stopStreaming() {
    if (!streaming) return;
    streaming.stopped = true;
    streaming.controller.abort();
  }

  let preparing = false; // between a click on Send and the request (the model list may load first)

  async function send() {
    if (streaming || preparing) return;
    preparing = true;
    try {
      await sendNow();
    } finally {
      preparing = false;
    }
  }

  async function sendNow() {
    const text = ui.input.value;
    if (!text.trim()) {
      ui.input.focus();
      return;
    }
    let params;
    try {
      params = readParams();
    } catch (e) {
      showApiError(e);
      return;
    }
    clearError();
    if (!model) {
      try {
        await loadModels();
      } catch (e) {
        showApiError(e);
        return; // the message stays in the input box
      }
    }

    let chat = currentChat();
    if (!chat) {
      chat = { id: newId(), title: titleFor(text), updated: Date.now(), messages: [] };
      state.chats.push(chat);
      state.currentId = chat.id;
    }
    const user = { role: "user", content: text, note: "" };
    const reply = { role: "assistant", content: "", note: "" };
    const history = chat.messages.map((m) => ({ role: m.role, content: m.content }));
    chat.messages.push(user, reply);
    chat.updated = Date.now();
    ui.input.value = "";
    saveChats();
    const views = render();
    const view = views[views.length - 1];

    const messages = [];
    if (ui.system.value.trim()) messages.push({ role: "system", content: ui.system.value });
    messages.push(...history, { role: "user", content: text });

    const controller = new AbortController();
    streaming = { controller, stopped: false };
    preparing = false;
    // Screen readers read the reply once it is complete, not at every token.
    ui.messages.setAttribute("aria-busy", "true");
    setStreamingUi(true);
    setStatus("Generating\u2026");
    let finish = null;
    let lastSave = Date.now();

    // New text goes on screen once per frame, not once per token: each update lays out the
    // whole reply again, and a fast model sends hundreds of tokens a second.
    let pending = "";
    let frame = 0;
    const flush = () => {
      if (frame) cancelAnimationFrame(frame);
      frame = 0;
      if (!pending) return;
      const follow = nearBottom();
      view.text.appendData(pending);
      pending = "";
      if (follow) scrollToBottom();
    };
    const append = (piece) => {
      reply.content += piece;
      pending += piece;
      if (!frame) frame = requestAnimationFrame(flush);
      if (Date.now() - lastSave > SAVE_EVERY_MS) {
        saveChats();
        lastSave = Date.now();
      }
    };

    try {
      let resp;
      try {
        resp = await fetch("v1/chat/completions", {
          method: "POST",
          headers: headers(true),
          body: JSON.stringify({
            model: model.id,
            messages,
            stream: true,
            temperature: params.temperature,
            max_tokens: params.maxTokens,
          }),
          signal: controller.signal,
        });
      } catch (e) {
        if (e && e.name === "AbortError") throw e;
        throw networkError(e);
      }
      if (!resp.ok) throw await errorFromResponse(resp);
      if (!resp.body) throw new ApiError("This browser cannot read streamed responses.", 0);

      let done = false;
      const parser = new SSEParser((data) => {
        if (done) return;
        if (data === "[DONE]") {
          done = true;
          return;
        }
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch (e) {
          throw new ApiError("The server sent something that is not JSON: " + data.slice(0, 200), 0);
        }
        if (chunk && chunk.error) {
          const err = chunk.error;
          throw new ApiError("The server reported an error: " + (typeof err === "string" ? err : err.message || JSON.stringify(err)), 0);
        }
        const choice = chunk && Array.isArray(chunk.choices) ? chunk.choices[0] : null;
        if (!choice) return;
        const delta = choice.delta || {};
        if (typeof delta.content === "string" && delta.content) append(delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      });

      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let eof = false;
      try {
        while (!done) {
          let chunk;
          try {
            chunk = await reader.read();
          } catch (e) {
            if (e && e.name === "AbortError") throw e;
            throw new ApiError("The connection broke during the reply (" + (e && e.message ? e.message : e) + ").", 0);
          }
          if (chunk.done) {
            eof = true;
            parser.push(decoder.decode());
            parser.end();
            break;
          }
          parser.push(decoder.decode(chunk.value, { stream: true }));
        }
      } finally {
        if (!eof) reader.cancel().catch(() => {}); // [DONE] or an error: close the stream
      }
      if (!done && !finish) throw new ApiError("The connection closed before the reply was complete.", 0);
      reply.note = finish === "length" ? "length" : "";
      setStatus(finish === "length" ? "The reply reached the max-tokens limit." : "");
    } catch (e) {
      if (streaming.stopped || (e && e.name === "AbortError")) {
        reply.note = "stopped";
        setStatus("Stopped.");
      } else {
        reply.note = "error";
        setStatus("");
        showApiError(e);
      }
      if (!reply.content) {
        // Nothing came back: drop the turn and give the text back, to edit or send again.
        chat.messages.splice(chat.messages.indexOf(user), 2);
        if (!ui.input.value) ui.input.value = text;
      }
    } finally {
      flush();
      ui.messages.removeAttribute("aria-busy");
      streaming = null;
      setStreamingUi(false);
      chat.updated = Date.now();
      if (!chat.messages.length) state.chats = state.chats.filter((c) => c !== chat);
      if (!state.chats.includes(chat) && state.currentId === chat.id) state.currentId = null;
      saveChats();
      if (reply.content) setNote(view, reply.note);
      else render();
      renderChatList();
    }
  }

  // -- wiring ------------------------------------------------------------------------------
  ui.system.value = typeof settings.system === "string" ? settings.system : "";
  ui.temperature.value = String(settings.temperature);
  ui.maxTokens.value = String(settings.maxTokens);
  ui.apiKey.value = localStorage.getItem(STORE_API_KEY) || "";

  ui.system.addEventListener("input", () => {
    settings.system = ui.system.value;
    saveSettings();
  });
  ui.temperature.addEventListener("input", () => {
    settings.temperature = ui.temperature.value;
    saveSettings();
  });
  ui.maxTokens.addEventListener("input", () => {
    settings.maxTokens = ui.maxTokens.value;
    saveSettings();
  });
  ui.apiKey.addEventListener("change", () => {
    const key = ui.apiKey.value.trim();
    try {
      if (key) localStorage.setItem(STORE_API_KEY, key);
      else localStorage.removeItem(STORE_API_KEY);
    } catch (e) {
      showError("Could not save the API key in this browser (" + e.message + ").");
    }
    refreshModel();
  });

  $("settings").addEventListener("submit", (e) => e.preventDefault()); // settings save as they change
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape" && streaming) {
      stopStreaming();
    }
  });
  ui.stop.addEventListener("click", stopStreaming);
  ui.newChat.addEventListener("click", newChat);
  ui.toggleSidebar.addEventListener("click", () => {
    const open = ui.app.classList.toggle("sidebar-open");
    ui.toggleSidebar.setAttribute("aria-expanded", String(open));
  });

  // Another tab changed the saved chats: show them (unless a reply is streaming in here).
  window.addEventListener("storage", (e) => {
    if (e.key === STORE_CHATS && !streaming) {
      state = cleanChats(readJson(STORE_CHATS, null));
      render();
    }
  });

  // For tests of the stream parser in a real browser (tests/test_serve_browser.py).
  window.lmforgeChat = Object.freeze({ SSEParser });

  setStreamingUi(false);
  render();
  refreshModel();
  ui.input.focus();
})();
