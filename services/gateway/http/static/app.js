// The chat page: sessions sidebar, conversation, streaming replies, quota and API key, and
// pictures attached to a message (images.js). All model output and titles reach the DOM as
// text nodes (see markdown.js); pictures only as data URLs (the CSP allows no other source).

import * as api from "./api.js";
import * as images from "./images.js";
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
  attachments: $("attachments"),
  attach: $("attach"),
  fileInput: $("file-input"),
  dropHint: $("drop-hint"),
  composerError: $("composer-error"),
  viewer: $("viewer"),
  viewerTitle: $("viewer-title"),
  viewerImage: $("viewer-image"),
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
  attachments: [], // pictures for the next message: images.readImage results + an id
  nextAttachmentId: 1,
  reading: Promise.resolve(), // files being checked and read: send() waits for them
  imageLimits: images.DEFAULT_LIMITS,
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
      if (error.code === "session_full") {
        // Too many messages, bytes or pictures in this chat: only a new chat helps.
        showNotice(`${error.message} Your message is still in the box.`);
        return;
      }
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
      quotaLine("Today", usage.images_per_day, "pictures"),
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

/**
 * The pictures of a message, each {url, alt}; a url of null (a stored picture this page will
 * not load, such as a remote URL) shows as a labelled placeholder.
 */
function messagePictures(pictures) {
  const box = el("div", "message-images");
  for (const picture of pictures) {
    if (picture.url) {
      // A button around it: the picture opens full size, by mouse or keyboard.
      const open = el("button", "message-image-open");
      open.type = "button";
      open.title = `${picture.alt} · open full size`;
      const img = el("img", "message-image");
      img.alt = picture.alt;
      img.decoding = "async";
      img.src = picture.url;
      open.append(img);
      open.addEventListener("click", () => openViewer(picture));
      box.append(open);
    } else {
      const missing = el("span", "message-image missing", `${picture.alt} (not shown)`);
      missing.setAttribute("role", "img");
      missing.setAttribute("aria-label", `${picture.alt}, not shown`);
      box.append(missing);
    }
  }
  return box;
}

function openViewer(picture) {
  ui.viewerTitle.textContent = picture.alt;
  ui.viewerImage.alt = picture.alt;
  ui.viewerImage.src = picture.url;
  ui.viewer.showModal(); // Escape or the × closes it; focus returns to the picture
}

/**
 * One message bubble. Assistant text is Markdown, user text is shown as typed, above it the
 * pictures the user sent ({url, alt} each).
 */
function addMessage(role, content = "", pictures = []) {
  ui.welcome.hidden = true;
  const article = el("article", `message ${role}`);
  article.dataset.role = role;
  const label = el("div", "message-role", role === "user" ? "You" : "DeepSeek-V2");
  const body = el("div", role === "user" ? "message-body plain" : "message-body md");
  const status = el("div", "message-status");
  status.hidden = true;
  article.append(label);
  if (pictures.length) article.append(messagePictures(pictures));
  article.append(body, status);
  ui.messages.append(article);

  let text = content;
  let frame = 0;
  const paint = () => {
    frame = 0;
    const follow = isNearBottom();
    if (role === "user") {
      body.textContent = text;
      body.hidden = !text && pictures.length > 0; // a picture sent without words
    } else body.replaceChildren(renderMarkdown(text));
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
      // Content is a string, or content parts when the message carried pictures.
      const { text, images: urls } = images.splitContent(message.content || "");
      const pictures = urls.map((url, i) => ({ url, alt: `Picture ${i + 1}` }));
      addMessage(message.role, text, pictures).setState("done");
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

function restoreInput(content, pictures = []) {
  // Never lose what the user typed: put it back, ahead of anything typed since; the same for
  // the pictures (as many as still fit beside any attached since).
  const typedSince = ui.input.value;
  ui.input.value = typedSince && content ? `${content}\n${typedSince}` : content || typedSince;
  const room = Math.max(0, state.imageLimits.maxImages - state.attachments.length);
  state.attachments = [...pictures.slice(0, room), ...state.attachments];
  renderAttachments();
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
      const busy = error instanceof api.ApiError && error.status === 409;
      if (!busy || error.code === "session_full" || attempt >= 6) throw error;
      await sleep(150 * (attempt + 1));
      if (signal.aborted) throw new DOMException("Stopped", "AbortError");
    }
  }
}

async function send() {
  if (state.controller) return;
  await state.reading; // pictures still being read belong to this message
  const text = ui.input.value;
  const pictures = state.attachments;
  if ((!text.trim() && !pictures.length) || state.controller) return;
  const content = images.turnContent(text, pictures);
  hideNotice();
  hideComposerError();
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  ui.input.value = "";
  state.attachments = [];
  renderAttachments();
  autosize();

  const shown = pictures.map((p, i) => ({ url: p.url, alt: `Picture ${i + 1}: ${p.name}` }));
  const question = addMessage("user", text, shown);
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
      // Nothing was answered: take the turn back and give the user their text and pictures.
      question.remove();
      reply.remove();
      restoreInput(text, pictures);
      if (pictures.length && isRefusal(error)) {
        // Most likely about the pictures (format, size, a text-only model): say it beside them.
        showComposerError(refusalText(error, pictures));
      } else {
        showError(error);
      }
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

// ---------------------------------------------------------------- pictures

/** The gateway refused the message itself (400 bad input, 413 too large, 422 unreadable). */
function isRefusal(error) {
  return error instanceof api.ApiError && [400, 413, 422].includes(error.status);
}

/**
 * The gateway's refusal, with a field path such as "content.1.image_url.url: ..." turned into
 * the picture the user sees ("Picture 2 (cat.png): ...").
 */
function refusalText(error, pictures) {
  if (error.code === "images_not_supported") return error.message; // the model's, not a picture's
  const match = /^content\.(\d+)\.image_url(\.url)?$/.exec(error.param || "");
  const index = match ? Number(match[1]) : -1; // the pictures are the first parts sent
  if (!(index >= 0 && index < pictures.length)) return error.message;
  const prefix = `${error.param}: `;
  const detail = error.message.startsWith(prefix)
    ? error.message.slice(prefix.length)
    : error.message;
  return `Picture ${index + 1} (${pictures[index].name}): ${detail}`;
}

function showComposerError(text) {
  ui.composerError.textContent = text;
  ui.composerError.hidden = false;
  ui.composer.classList.add("invalid");
}

function hideComposerError() {
  ui.composerError.hidden = true;
  ui.composerError.textContent = "";
  ui.composer.classList.remove("invalid");
}

function renderAttachments() {
  const items = state.attachments.map((picture, index) => {
    const li = el("li", "attachment");
    li.dataset.id = String(picture.id);
    const img = el("img", "attachment-image");
    img.alt = `Picture ${index + 1}: ${picture.name}`;
    img.src = picture.url;
    const size = picture.width ? `${picture.width}×${picture.height}, ` : "";
    li.title = `${picture.name} (${size}${images.formatBytes(picture.size)})`;
    const remove = el("button", "attachment-remove", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove picture ${index + 1}: ${picture.name}`);
    remove.addEventListener("click", () => removeAttachment(picture.id));
    li.append(img, remove);
    return li;
  });
  ui.attachments.replaceChildren(...items);
  ui.attachments.hidden = items.length === 0;
  const full = state.attachments.length >= state.imageLimits.maxImages;
  ui.attach.setAttribute("aria-disabled", String(full));
  ui.attach.classList.toggle("full", full);
}

function removeAttachment(id) {
  const index = state.attachments.findIndex((picture) => picture.id === id);
  if (index < 0) return;
  state.attachments = state.attachments.filter((picture) => picture.id !== id);
  hideComposerError();
  renderAttachments();
  // Keep the keyboard where it was: on the next picture's remove button, else the text box.
  const buttons = ui.attachments.querySelectorAll(".attachment-remove");
  (buttons[Math.min(index, buttons.length - 1)] || ui.input).focus();
}

/**
 * Check and read files from the picker, a paste or a drop, in order; add those that pass
 * and say inline what is wrong with the others.
 */
function addFiles(files) {
  const work = state.reading.then(async () => {
    hideComposerError();
    const problems = [];
    for (const file of files) {
      try {
        const sizes = state.attachments.map((picture) => picture.size);
        images.checkRoom(file, sizes, state.imageLimits);
        const picture = await images.readImage(file, state.imageLimits);
        state.attachments = [...state.attachments, { ...picture, id: state.nextAttachmentId++ }];
        renderAttachments();
      } catch (error) {
        problems.push(error instanceof images.ImageError ? error.message : String(error));
      }
    }
    if (problems.length) showComposerError(problems.join("\n")); // one line each
  });
  state.reading = work.catch(() => {});
  return work;
}

/** The gateway's own limits, when its model card announces them (else the defaults stay). */
async function loadImageLimits() {
  try {
    state.imageLimits = images.limitsFrom(await api.getModelCard());
    renderAttachments();
  } catch {
    /* the model plane may be down now: the defaults apply and the gateway checks anyway */
  }
}

ui.attach.addEventListener("click", () => {
  if (state.attachments.length >= state.imageLimits.maxImages) {
    const { maxImages } = state.imageLimits;
    showComposerError(
      `A message can carry at most ${maxImages} picture${maxImages === 1 ? "" : "s"}: ` +
        "remove one to attach another.",
    );
    return;
  }
  ui.fileInput.click();
});
ui.fileInput.accept = images.ACCEPT;
ui.fileInput.addEventListener("change", () => {
  const files = [...ui.fileInput.files];
  ui.fileInput.value = ""; // choosing the same file again must fire `change` again
  addFiles(files).finally(() => ui.input.focus());
});

ui.input.addEventListener("paste", (event) => {
  const files = images.filesOf(event.clipboardData);
  if (!files.length) return; // plain text: the browser pastes it
  event.preventDefault();
  addFiles(files);
});

const carriesFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");

function setDragging(on) {
  ui.composer.classList.toggle("dragging", on);
  ui.dropHint.hidden = !on;
}

ui.composer.addEventListener("dragover", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = "copy";
  setDragging(true);
});
ui.composer.addEventListener("dragleave", (event) => {
  if (!ui.composer.contains(event.relatedTarget)) setDragging(false);
});
ui.composer.addEventListener("drop", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  setDragging(false);
  addFiles(images.filesOf(event.dataTransfer));
  ui.input.focus();
});
// A file dropped beside the composer must not make the browser leave the chat to show it.
for (const type of ["dragover", "drop"]) {
  window.addEventListener(type, (event) => {
    if (carriesFiles(event) && !ui.composer.contains(event.target)) event.preventDefault();
  });
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
  loadImageLimits(); // not awaited: the defaults serve until the model card answers
  await refreshSessions();
  const id = idFromHash();
  if (id) await openSession(id);
  document.body.dataset.ready = "true";
  ui.input.focus();
}

start();
