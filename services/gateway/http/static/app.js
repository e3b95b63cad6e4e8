// The chat page: sessions sidebar, conversation, streaming replies, quota and API key.
// All model output and titles reach the DOM as text nodes (see markdown.js).

import * as api from "./api.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"),
  backdrop: $("backdrop"),
  toggleSidebar: $("toggle-sidebar"),
  sessionList: $("session-list"),
  sessionEmpty: $("session-empty"),
  newChat: $("new-chat"),
  newChatTop: $("new-chat-top"),
  usage: $("usage"),
  usageCompact: $("usage-compact"),
  identity: $("identity"),
  openSettings: $("open-settings"),
  title: $("chat-title"),
  messages: $("messages"),
  welcome: $("welcome"),
  notice: $("notice"),
  noticeText: $("notice-text"),
  noticeClose: $("notice-close"),
  composer: $("composer"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  settings: $("settings"),
  settingsForm: $("settings-form"),
  apiKey: $("api-key"),
  removeKey: $("remove-key"),
  cancelKey: $("cancel-key"),
};

const state = {
  sessions: [],
  currentId: null,
  controller: null, // AbortController of the reply being streamed
  countdown: null, // interval id of the "try again in" countdown
  tier: null,
};

const HASH_PREFIX = "#/chat/";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- notices

function clearCountdown() {
  if (state.countdown !== null) clearInterval(state.countdown);
  state.countdown = null;
}

function showNotice(text, kind = "error") {
  clearCountdown();
  ui.noticeText.textContent = text;
  ui.notice.dataset.kind = kind;
  ui.notice.hidden = false;
}

function hideNotice() {
  clearCountdown();
  ui.notice.hidden = true;
  ui.noticeText.textContent = "";
}

function formatWait(seconds) {
  if (seconds >= 3600) {
    const hours = Math.floor(seconds / 3600);
    const minutes = Math.ceil((seconds % 3600) / 60);
    return minutes ? `${hours} h ${minutes} min` : `${hours} h`;
  }
  if (seconds >= 60) {
    const minutes = Math.floor(seconds / 60);
    const rest = seconds % 60;
    return rest ? `${minutes} min ${rest} s` : `${minutes} min`;
  }
  return `${seconds} s`;
}

/** Show `lead` + the wait, counting down the seconds to when sending works again. */
function showCountdown(lead, seconds, kind, onDone = () => {}) {
  const render = () => {
    const wait =
      seconds === null
        ? " Please try again a little later."
        : seconds > 0
          ? ` You can send again in ${formatWait(seconds)}.`
          : " You can send again now.";
    ui.noticeText.textContent = `${lead}${wait}`;
  };
  showNotice("", kind);
  render();
  if (seconds !== null && seconds > 0) {
    state.countdown = setInterval(() => {
      seconds -= 1;
      render();
      if (seconds <= 0) {
        clearCountdown();
        onDone();
      }
    }, 1000);
  }
}

/** A 503 "overloaded": the model plane sheds this tier's requests while it is at capacity. */
function showBusy(error) {
  const lead =
    "The service is very busy right now, so messages from your plan are paused for a moment " +
    "(nothing was taken from your quota). Your message is still in the box.";
  showCountdown(lead, error.retryAfter ?? null, "busy");
}

/** A 429: say which limit was hit and count down to when sending works again. */
function showLimit(error) {
  const who = state.tier && state.tier !== "free" ? "your plan's" : "the free";
  const lead = `You've reached ${who} usage limit.`;
  // The countdown below replaces the server's own "Retry after N s." sentence.
  const reason = (error.message || "").replace(/\s*Retry after [^.]*\.?\s*$/i, "").trim();
  const detail = reason ? ` ${reason}` : "";
  showCountdown(`${lead}${detail}`, error.retryAfter ?? null, "limit", refreshUsage);
}

function showError(error) {
  if (!(error instanceof api.ApiError)) {
    showNotice(`Something went wrong: ${error?.message || error}`);
    return;
  }
  switch (error.status) {
    case 429:
      showLimit(error);
      return;
    case 503:
      if (error.code === "overloaded") {
        showBusy(error);
        return;
      }
      showNotice(
        `The chat service is temporarily unavailable: ${error.message} ` +
          "Your message is still in the box, so you can send it again in a moment.",
      );
      return;
    case 401:
    case 403:
      showNotice(
        `Your API key was not accepted (${error.message}). ` +
          "Fix it under the key settings, or remove it to chat as a guest.",
      );
      return;
    case 409:
      showNotice("A reply is still being written in this chat. Wait for it or press Stop.");
      return;
    case 0:
      showNotice(error.message);
      return;
    default:
      showNotice(
        error.status >= 500
          ? `The server had a problem (${error.status}): ${error.message}`
          : error.message,
      );
  }
}

// ---------------------------------------------------------------- quota

function quotaLine(label, quota, unit) {
  if (!quota) return null;
  const remaining = Math.max(0, Number(quota.remaining ?? 0));
  const limit = Number(quota.limit);
  const row = el("div", "quota");
  const text = el("div", "quota-text");
  text.append(el("span", "", label));
  if (quota.limit === null || quota.limit === undefined || !(limit > 0)) {
    // No limit on this quota for the caller's tier.
    text.append(el("span", "quota-value", `unlimited ${unit}`));
    row.append(text);
    return row;
  }
  text.append(
    el("span", "quota-value", `${remaining.toLocaleString()} / ${limit.toLocaleString()} ${unit}`),
  );
  const meter = el("meter");
  meter.min = 0;
  meter.max = limit || 1;
  meter.low = limit * 0.2;
  meter.optimum = limit;
  meter.value = remaining;
  row.append(text, meter);
  row.title = `${remaining} of ${limit} ${unit} left ${label.toLowerCase()}`;
  return row;
}

async function refreshUsage() {
  try {
    const usage = await api.getUsage();
    state.tier = usage.tier || null;
    const lines = [
      quotaLine("This minute", usage.requests_per_minute, "requests"),
      quotaLine("Today", usage.requests_per_day, "requests"),
      quotaLine("Today", usage.tokens_per_day, "tokens"),
    ].filter(Boolean);
    const heading = el(
      "p",
      "usage-title",
      state.tier ? `${state.tier[0].toUpperCase()}${state.tier.slice(1)} tier · remaining` : "Remaining quota",
    );
    ui.usage.replaceChildren(heading, ...lines);
    ui.usage.dataset.tier = state.tier || "";
    showCompactUsage(usage);
  } catch (error) {
    // A wrong API key fails every call: say so once, where it can be fixed.
    if (error instanceof api.ApiError && (error.status === 401 || error.status === 403)) {
      showError(error);
    }
    const message =
      error instanceof api.ApiError && error.status === 503
        ? "Quota unavailable right now."
        : "Could not load your quota.";
    ui.usage.replaceChildren(el("p", "muted small", message));
  }
  updateIdentity();
}

/** Phone width hides the sidebar: keep the tightest remaining request count in the top bar. */
function showCompactUsage(usage) {
  const quotas = [
    [usage.requests_per_minute, "this minute"],
    [usage.requests_per_day, "today"],
  ].filter(([quota]) => quota && quota.limit > 0);
  if (!quotas.length) {
    ui.usageCompact.hidden = true;
    return;
  }
  const [quota, when] = quotas.reduce((a, b) => (b[0].remaining < a[0].remaining ? b : a));
  const remaining = Math.max(0, Number(quota.remaining ?? 0));
  ui.usageCompact.textContent = `${remaining.toLocaleString()} left`;
  ui.usageCompact.title = `${remaining} of ${quota.limit} requests left ${when}`;
  ui.usageCompact.hidden = false;
}

function updateIdentity() {
  const key = api.getApiKey();
  ui.identity.textContent = key
    ? `API key …${key.slice(-4)} · ${state.tier || "signed in"}`
    : "Guest · add API key";
}

// ---------------------------------------------------------------- sidebar

function sessionTitle(session) {
  const title = (session.title || "").trim();
  return title || "New chat";
}

function renderSessions() {
  const items = state.sessions.map((session) => {
    const li = el("li", "session");
    li.dataset.id = session.id;
    const open = el("button", "session-open", sessionTitle(session));
    open.type = "button";
    open.title = sessionTitle(session);
    if (session.id === state.currentId) open.setAttribute("aria-current", "page");
    open.addEventListener("click", () => {
      openSession(session.id);
    });
    const remove = el("button", "session-delete", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete chat: ${sessionTitle(session)}`);
    remove.title = "Delete chat";
    remove.addEventListener("click", () => {
      removeSession(session.id);
    });
    li.append(open, remove);
    return li;
  });
  ui.sessionList.replaceChildren(...items);
  ui.sessionEmpty.hidden = items.length > 0;
}

async function refreshSessions() {
  try {
    const sessions = await api.listSessions();
    sessions.sort((a, b) => (b.updated_at ?? 0) - (a.updated_at ?? 0));
    state.sessions = sessions;
    renderSessions();
    const current = sessions.find((s) => s.id === state.currentId);
    if (current) ui.title.textContent = sessionTitle(current);
  } catch (error) {
    // Keep the list we had; the conversation area shows errors that matter more.
    if (!state.sessions.length) {
      ui.sessionEmpty.hidden = false;
      ui.sessionEmpty.textContent =
        error instanceof api.ApiError && error.status === 503
          ? "Chat history is unavailable right now."
          : "Could not load your chats.";
    }
  }
}

async function removeSession(id) {
  try {
    await api.deleteSession(id);
  } catch (error) {
    if (!(error instanceof api.ApiError && error.status === 404)) {
      showError(error);
      return;
    }
  }
  state.sessions = state.sessions.filter((s) => s.id !== id);
  renderSessions();
  if (id === state.currentId) newChat();
}

function setSidebarOpen(open) {
  ui.sidebar.classList.toggle("open", open);
  ui.backdrop.hidden = !open;
  ui.toggleSidebar.setAttribute("aria-expanded", String(open));
}

// ---------------------------------------------------------------- conversation

function isNearBottom() {
  const box = ui.messages;
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

/** One message bubble. Assistant text is Markdown, user text is shown as typed. */
function addMessage(role, content = "") {
  ui.welcome.hidden = true;
  const article = el("article", `message ${role}`);
  article.dataset.role = role;
  const label = el("div", "message-role", role === "user" ? "You" : "DeepSeek-V2");
  const body = el("div", role === "user" ? "message-body plain" : "message-body md");
  const status = el("div", "message-status");
  status.hidden = true;
  article.append(label, body, status);
  ui.messages.append(article);

  let text = content;
  let frame = 0;
  const paint = () => {
    frame = 0;
    const follow = isNearBottom();
    if (role === "user") body.textContent = text;
    else body.replaceChildren(renderMarkdown(text));
    if (follow) scrollToBottom();
  };
  paint();
  return {
    article,
    get text() {
      return text;
    },
    // Streaming deltas arrive faster than frames: repaint at most once per frame.
    append(delta) {
      text += delta;
      if (!frame) frame = requestAnimationFrame(paint);
    },
    flush() {
      if (frame) cancelAnimationFrame(frame);
      paint();
    },
    setState(value, note) {
      article.dataset.state = value;
      article.setAttribute("aria-busy", String(value === "streaming"));
      status.hidden = !note;
      status.textContent = note || "";
    },
    remove() {
      if (frame) cancelAnimationFrame(frame);
      article.remove();
      if (!ui.messages.querySelector(".message")) ui.welcome.hidden = false;
    },
  };
}

function clearConversation() {
  for (const node of ui.messages.querySelectorAll(".message")) node.remove();
  ui.welcome.hidden = false;
}

function setHash(id) {
  const hash = id ? `${HASH_PREFIX}${encodeURIComponent(id)}` : "";
  if (window.location.hash !== hash) {
    history.replaceState(null, "", hash || window.location.pathname + window.location.search);
  }
}

function idFromHash() {
  const { hash } = window.location;
  return hash.startsWith(HASH_PREFIX) ? decodeURIComponent(hash.slice(HASH_PREFIX.length)) : null;
}

function stopStreaming() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stopStreaming();
  hideNotice();
  state.currentId = null;
  setHash(null);
  clearConversation();
  ui.title.textContent = "New chat";
  renderSessions();
  setSidebarOpen(false);
  ui.input.focus();
}

async function openSession(id) {
  stopStreaming();
  setSidebarOpen(false);
  if (id === state.currentId && ui.messages.querySelector(".message")) return;
  hideNotice();
  state.currentId = id;
  setHash(id);
  renderSessions();
  clearConversation();
  try {
    const session = await api.getSession(id);
    if (state.currentId !== id) return; // the user moved on meanwhile
    ui.title.textContent = sessionTitle(session);
    for (const message of session.messages || []) {
      if (message.role !== "user" && message.role !== "assistant") continue;
      addMessage(message.role, message.content || "").setState("done");
    }
    scrollToBottom();
  } catch (error) {
    if (state.currentId !== id) return;
    if (error instanceof api.ApiError && error.status === 404) {
      state.currentId = null;
      setHash(null);
      ui.title.textContent = "New chat";
      showNotice("That chat no longer exists (it may have expired or been deleted).", "info");
      refreshSessions();
    } else {
      showError(error);
    }
  }
}

function setStreaming(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  ui.composer.classList.toggle("busy", on);
  if (!on) state.controller = null;
}

function restoreInput(content) {
  // Never lose what the user typed: put it back, ahead of anything typed since.
  const typedSince = ui.input.value;
  ui.input.value = typedSince ? `${content}\n${typedSince}` : content;
  autosize();
  ui.input.focus();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Start a turn, waiting briefly while the previous one is still being closed on the server
 * (409 right after Stop: the partial reply is being saved).
 */
async function startTurn(id, content, signal) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await api.startTurn(id, content, signal);
    } catch (error) {
      if (!(error instanceof api.ApiError && error.status === 409) || attempt >= 6) throw error;
      await sleep(150 * (attempt + 1));
      if (signal.aborted) throw new DOMException("Stopped", "AbortError");
    }
  }
}

async function send() {
  const content = ui.input.value;
  if (!content.trim() || state.controller) return;
  hideNotice();
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  ui.input.value = "";
  autosize();

  const question = addMessage("user", content);
  const reply = addMessage("assistant", "");
  reply.setState("streaming");
  scrollToBottom();
  let finish = null;
  try {
    if (!state.currentId) {
      const session = await api.createSession();
      if (controller.signal.aborted) throw new DOMException("Stopped", "AbortError");
      state.currentId = session.id;
      setHash(session.id);
      state.sessions = [session, ...state.sessions.filter((s) => s.id !== session.id)];
      renderSessions();
    }
    const response = await startTurn(state.currentId, content, controller.signal);
    // Accepted: the server has titled a new chat and counted the request.
    refreshSessions();
    refreshUsage();
    for await (const event of api.turnEvents(response)) {
      if (event.type === "delta" && typeof event.text === "string") {
        reply.append(event.text);
      } else if (event.type === "done") {
        finish = event;
      } else if (event.type === "error") {
        finish = { finish_reason: "error", error: event.message || event.error?.message };
      }
    }
    reply.flush();
    const reason = finish?.finish_reason;
    if (!finish) {
      reply.setState("error", "The connection closed before the reply finished.");
    } else if (reason === "error") {
      reply.setState("error", "The reply was cut short by a server error.");
      const detail = typeof finish.error === "string" && finish.error ? `: ${finish.error}` : ".";
      showNotice(
        `The model could not answer${detail} Your message is saved in this chat; ` +
          "send it again in a moment to retry.",
      );
    } else if (reason === "length") {
      reply.setState("done", "Reply stopped at the length limit.");
    } else if (reason === "cancelled") {
      reply.setState("stopped", "Stopped.");
    } else {
      reply.setState("done");
    }
  } catch (error) {
    reply.flush();
    if (error?.name === "AbortError") {
      if (reply.text) reply.setState("stopped", "Stopped.");
      else reply.remove();
    } else if (!reply.text) {
      // Nothing was answered: take the turn back and give the user their text.
      question.remove();
      reply.remove();
      restoreInput(content);
      showError(error);
    } else {
      reply.setState("error", "The connection was interrupted.");
      showError(error);
    }
  } finally {
    if (state.controller === controller) setStreaming(false);
    refreshSessions();
    refreshUsage();
  }
}

// ---------------------------------------------------------------- composer

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

ui.input.addEventListener("keydown", (event) => {
  // isComposing: Enter that confirms a Chinese/Japanese IME candidate must not send.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    send();
  } else if (event.key === "Escape" && state.controller) {
    stopStreaming();
  }
});
ui.input.addEventListener("input", autosize);
ui.stop.addEventListener("click", stopStreaming);
ui.noticeClose.addEventListener("click", hideNotice);
ui.newChat.addEventListener("click", newChat);
ui.newChatTop.addEventListener("click", newChat);
ui.toggleSidebar.addEventListener("click", () => {
  setSidebarOpen(!ui.sidebar.classList.contains("open"));
});
ui.backdrop.addEventListener("click", () => setSidebarOpen(false));
for (const example of document.querySelectorAll(".example")) {
  example.addEventListener("click", () => {
    ui.input.value = example.textContent.trim();
    autosize();
    ui.input.focus();
  });
}

// Copy buttons of code blocks (rendered by markdown.js without handlers).
ui.messages.addEventListener("click", async (event) => {
  const button = event.target.closest?.(".code-copy");
  if (!button) return;
  const code = button.closest(".code-block")?.querySelector("code");
  try {
    await navigator.clipboard.writeText(code?.textContent ?? "");
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
});

// ---------------------------------------------------------------- API key dialog

ui.openSettings.addEventListener("click", () => {
  ui.apiKey.value = api.getApiKey();
  ui.settings.showModal();
  ui.apiKey.focus();
});

function applyIdentityChange(key) {
  api.setApiKey(key);
  ui.settings.close();
  // Another identity has other chats and another quota.
  state.sessions = [];
  newChat();
  refreshSessions();
  refreshUsage();
}

ui.settingsForm.addEventListener("submit", (event) => {
  event.preventDefault();
  applyIdentityChange(ui.apiKey.value.trim());
});
ui.removeKey.addEventListener("click", () => applyIdentityChange(""));
ui.cancelKey.addEventListener("click", () => ui.settings.close());

// ---------------------------------------------------------------- start

window.addEventListener("hashchange", () => {
  const id = idFromHash();
  if (id && id !== state.currentId) openSession(id);
  else if (!id && state.currentId) newChat();
});

async function start() {
  updateIdentity();
  // Usage first: its response sets the anonymous cookie the other calls rely on.
  await refreshUsage();
  await refreshSessions();
  const id = idFromHash();
  if (id) await openSession(id);
  document.body.dataset.ready = "true";
  ui.input.focus();
}

start();
