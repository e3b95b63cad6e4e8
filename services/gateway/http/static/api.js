// The gateway's HTTP API as the page uses it (see the sessions API in the project docs).
// Identity is the anonymous cookie the gateway sets, or an API key kept in this browser.

import { readServerSentEvents } from "./sse.js";

const KEY_STORAGE = "dsv2.apiKey";

export function getApiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled: act as a guest
  }
}

export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key lasts for this page only */
  }
}

/** An HTTP error from the gateway, with its OpenAI-style error body unpacked. */
export class ApiError extends Error {
  constructor(status, message, { type = "", code = null, param = null, retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.code = code;
    this.param = param; // the request field at fault, e.g. "content.0.image_url.url"
    this.retryAfter = retryAfter; // seconds, from Retry-After
  }
}

/** Seconds from a Retry-After header: either delta-seconds or an HTTP date. */
export function parseRetryAfter(value) {
  if (!value) return null;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number.parseInt(trimmed, 10);
  const when = Date.parse(trimmed);
  if (Number.isNaN(when)) return null;
  return Math.max(0, Math.ceil((when - Date.now()) / 1000));
}

async function toApiError(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let type = "";
  let code = null;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      message = body.error.message;
      type = body.error.type || "";
      code = body.error.code ?? null;
      param = typeof body.error.param === "string" ? body.error.param : null;
    } else if (body && typeof body.detail === "string") {
      message = body.detail;
    }
  } catch {
    /* not JSON: keep the status line */
  }
  const retryAfter = parseRetryAfter(response.headers.get("Retry-After"));
  return new ApiError(response.status, message, { type, code, param, retryAfter });
}

async function request(method, path, { body, signal, accept = "application/json" } = {}) {
  const headers = { Accept: accept };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = getApiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Cannot reach the server. Check your connection and try again.", {
      type: "network_error",
    });
  }
  if (!response.ok) throw await toApiError(response);
  return response;
}

const sessionPath = (id) => `/v1/sessions/${encodeURIComponent(id)}`;

// Every session: the list comes a page at a time (has_more / next_cursor).
export async function listSessions() {
  const sessions = [];
  let after = null;
  for (let page = 0; page < 100; page += 1) {
    const query = after ? `?after=${encodeURIComponent(after)}` : "";
    const body = await (await request("GET", `/v1/sessions${query}`)).json();
    if (Array.isArray(body.data)) sessions.push(...body.data);
    if (!body.has_more || !body.next_cursor) break;
    after = body.next_cursor;
  }
  return sessions;
}

export async function createSession(title) {
  const body = title ? { title } : {};
  return (await request("POST", "/v1/sessions", { body })).json();
}

export async function getSession(id) {
  return (await request("GET", sessionPath(id))).json();
}

export async function deleteSession(id) {
  await request("DELETE", sessionPath(id));
}

export async function getUsage() {
  return (await request("GET", "/v1/usage")).json();
}

/** The served model's card from `GET /v1/models` (the first; the gateway serves one). */
export async function getModelCard() {
  const body = await (await request("GET", "/v1/models")).json();
  return Array.isArray(body.data) ? body.data[0] || null : null;
}

/**
 * Send one user turn: `content` is a string, or OpenAI content parts when it carries
 * pictures (see images.turnContent). Resolves once the gateway has accepted it (errors such as 429 or 503
 * reject here, before anything streams); read the reply with `turnEvents`. Aborting `signal`
 * closes the stream, which cancels generation on the server.
 */
export async function startTurn(id, content, signal) {
  return request("POST", `${sessionPath(id)}/messages`, {
    body: { content },
    signal,
    accept: "text/event-stream",
  });
}

/** The reply's events: {type: "delta", text} ... then {type: "done", finish_reason, ...}. */
export async function* turnEvents(response) {
  for await (const { data } of readServerSentEvents(response)) {
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      continue; // not one of ours (e.g. a "[DONE]" sentinel)
    }
    if (event && typeof event === "object") yield event;
  }
}
