// liveness-proxy-client.js: a dependency-free browser client for liveness-proxy.
// An ES module, served by the proxy at /client/liveness-proxy-client.js; types in the .d.ts next to it.
// The credential (API key or JWT) only ever goes into the Authorization header: never into an error,
// a message or a call report.

const PROBLEM_TYPE_PREFIX = "urn:liveness-proxy:problem:";
const SESSION_ID_PATTERN = /^[A-Za-z0-9_-]{1,128}$/;
// What the proxy accepts as an Idempotency-Key (the AWS ClientRequestToken alphabet).
const IDEMPOTENCY_KEY_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
const CREDENTIAL_PATTERN = /^[\x21-\x7e]+$/; // one header token: visible ASCII, no spaces
// The same set the proxy records verdicts for (privacy.py): any other status means "not finished yet".
const TERMINAL_STATUSES = new Set(["SUCCEEDED", "FAILED", "EXPIRED"]);
const BACKOFF_FACTOR = 2;
// Never poll back to back, whatever maxDelayMs says.
const MIN_DELAY_MS = 50;
// createSession: the first wait before a retry (jittered, doubled after each one).
const RETRY_INITIAL_DELAY_MS = 250;
// createSession: how long a 409 idempotency-key-in-flight (an earlier attempt of the same call still
// at work in the proxy) is waited out. Longer than the proxy holds a key for a create in flight with
// its default timeouts (72 s), after which the key is answered or free again.
const IN_FLIGHT_WAIT_MS = 90000;

/**
 * Whether a liveness status is final: `SUCCEEDED`, `FAILED` or `EXPIRED`, the statuses the proxy
 * records a verdict for. Anything else (`CREATED`, an in-progress status) means "keep polling".
 * @param {unknown} status the `status` of a liveness result
 * @returns {boolean} true when polling can stop
 */
export function isTerminalStatus(status) {
  return typeof status === "string" && TERMINAL_STATUSES.has(status);
}

/**
 * A fresh `Idempotency-Key`: `crypto.randomUUID()` where there is one (secure contexts), else 128
 * random bits in hex. `createSession` makes one per call; make your own and pass it as
 * `idempotencyKey` to try the same create again later (after `createSession` gave up) without the
 * risk of a second session.
 * @returns {string} 1-64 characters of A-Za-z0-9_-
 */
export function newIdempotencyKey() {
  const crypto = globalThis.crypto;
  if (typeof crypto?.randomUUID === "function") return crypto.randomUUID();
  const bytes = new Uint8Array(16);
  if (typeof crypto?.getRandomValues === "function") {
    crypto.getRandomValues(bytes);
  } else {
    // No Web Crypto at all (an old engine). A key must be unique among one caller's creates of a
    // day, never secret (the proxy keeps keys per caller subject), so Math.random is enough here.
    for (let i = 0; i < bytes.length; i += 1) bytes[i] = Math.floor(Math.random() * 256);
  }
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * Any non-2xx answer of the proxy (and a 2xx answer whose body is not what was expected).
 * The fields come from the RFC 9457 problem details body when there is one.
 */
export class LivenessProxyError extends Error {
  /**
   * @param {{status: number, problem?: object|null, requestId?: string|null,
   *   retryAfterSeconds?: number|null, type?: string|null, title?: string, detail?: string,
   *   replayed?: boolean}} init
   */
  constructor({ status, problem = null, requestId = null, retryAfterSeconds = null, type, title, detail, replayed = false }) {
    const p = problem ?? {};
    const finalTitle = title ?? str(p.title) ?? "Error response from the proxy";
    const finalDetail = detail ?? str(p.detail) ?? "";
    super(`${finalTitle} (HTTP ${status})${finalDetail ? `: ${finalDetail}` : ""}`);
    this.name = new.target.name;
    /** @type {number} HTTP status of the answer. */
    this.status = status;
    /** @type {string|null} The problem `type` URI. */
    this.type = type !== undefined ? type : str(p.type) ?? null;
    /** @type {string|null} The part of `type` after "urn:liveness-proxy:problem:", e.g. "rate-limited". */
    this.slug = this.type?.startsWith(PROBLEM_TYPE_PREFIX) ? this.type.slice(PROBLEM_TYPE_PREFIX.length) : null;
    /** @type {string} */
    this.title = finalTitle;
    /** @type {string} */
    this.detail = finalDetail;
    /** @type {string|null} The problem's `request_id`, else the `X-Request-ID` header. */
    this.requestId = str(p.request_id) ?? requestId ?? null;
    /** @type {number|null} Seconds from the `Retry-After` header, when there was one. */
    this.retryAfterSeconds = retryAfterSeconds;
    /** @type {object|null} The whole parsed problem body, or null if the body was not problem JSON. */
    this.problem = problem;
    /**
     * @type {boolean} true when the answer carried `Idempotent-Replayed: true`: the stored outcome of
     * an earlier request with the same Idempotency-Key, which every retry with that key gets again.
     */
    this.replayed = replayed;
  }
}

/** 429: a per-subject limit of the proxy (`rate-limited`) or of Cynopsis (`upstream-rate-limited`). */
export class RateLimitedError extends LivenessProxyError {
  /** @returns {string|null} the limit that was hit (`session_token`, `daily_attempts`, ...), if named */
  get limit() {
    return str(this.problem?.limit) ?? null;
  }
}

/** 401: no credential, or a wrong, revoked or expired one. Sign in again. */
export class AuthenticationError extends LivenessProxyError {}

/** 502, 503 or 504: the proxy, its store or the Cynopsis API cannot answer now. Worth retrying. */
export class UpstreamUnavailableError extends LivenessProxyError {}

/** `waitForResult` gave up: no terminal status before its deadline. */
export class LivenessTimeoutError extends Error {
  /**
   * @param {string} sessionId
   * @param {{lastStatus?: string|null, attempts?: number, timeoutMs?: number, cause?: unknown}} [info]
   */
  constructor(sessionId, { lastStatus = null, attempts = 0, timeoutMs, cause } = {}) {
    super(`No terminal liveness result for session ${sessionId} within ${timeoutMs} ms ` +
      `(${attempts} checks, last status ${lastStatus ?? "unknown"}).`, cause === undefined ? undefined : { cause });
    this.name = "LivenessTimeoutError";
    /** @type {string} */
    this.sessionId = sessionId;
    /** @type {string|null} The last status read, or null if no read succeeded. */
    this.lastStatus = lastStatus;
    /** @type {number} How many reads were made. */
    this.attempts = attempts;
  }
}

/** `fetch` itself failed: offline, DNS, TLS, CORS refused, connection reset. */
export class NetworkError extends Error {
  /**
   * @param {string} message
   * @param {{cause?: unknown}} [options] `cause` is the error `fetch` threw
   */
  constructor(message, { cause } = {}) {
    super(message, { cause });
    this.name = "NetworkError";
    /** @type {unknown} */
    this.cause = cause;
  }
}

/** No answer within the per-attempt `timeoutMs` of `createSession`: the request may or may not have
 * reached the proxy. A NetworkError, so code that handles those handles this too. */
export class RequestTimeoutError extends NetworkError {
  /**
   * @param {string} message
   * @param {{cause?: unknown, timeoutMs?: number}} [options]
   */
  constructor(message, { cause, timeoutMs } = {}) {
    super(message, { cause });
    this.name = "RequestTimeoutError";
    /** @type {number|undefined} The limit that passed. */
    this.timeoutMs = timeoutMs;
  }
}

function str(value) {
  return typeof value === "string" ? value : undefined;
}

function isPlainObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function now() {
  return globalThis.performance?.now ? globalThis.performance.now() : Date.now();
}

function parseRetryAfter(value) {
  if (value == null) return null;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text);
  const date = Date.parse(text);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

function abortReason(signal) {
  return signal.reason ?? new DOMException("The operation was aborted.", "AbortError");
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortReason(signal));
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortReason(signal));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, Math.max(0, ms));
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

// A listener's bug must not break the call it observes: rethrown on its own, so it still shows up.
function notify(listener, value) {
  if (!listener) return;
  try {
    listener(value);
  } catch (error) {
    queueMicrotask(() => { throw error; });
  }
}

function errorFor(init) {
  const { status } = init;
  if (status === 401) return new AuthenticationError(init);
  if (status === 429) return new RateLimitedError(init);
  if (status === 502 || status === 503 || status === 504) return new UpstreamUnavailableError(init);
  return new LivenessProxyError(init);
}

function unexpected(status, requestId, detail) {
  return new LivenessProxyError({ status, requestId, type: null, title: "Unexpected response from the proxy", detail });
}

function isTransient(error) {
  return error instanceof RateLimitedError || error instanceof UpstreamUnavailableError || error instanceof NetworkError;
}

// A create the proxy refused or failed without a final answer: worth the same request again, under the
// same key. A replayed answer is the final one (every retry would get it again), and a 4xx other than
// 429 would be refused again.
function isRetriableCreateFailure(error) {
  if (error instanceof NetworkError) return true; // RequestTimeoutError too
  return (error instanceof RateLimitedError || error instanceof UpstreamUnavailableError) && !error.replayed;
}

// The proxy is still at work on an earlier attempt with this key (one we gave up on): its answer is
// stored for the key when it ends, and the next retry gets it.
function isKeyInFlight(error) {
  return error instanceof LivenessProxyError && error.status === 409 && error.slug === "idempotency-key-in-flight";
}

function checkSessionId(sessionId) {
  if (typeof sessionId !== "string" || !SESSION_ID_PATTERN.test(sessionId)) {
    throw new TypeError("sessionId must be 1-128 characters of A-Za-z0-9_-.");
  }
}

/** A client of one liveness-proxy deployment, for one caller (one credential). */
export class LivenessProxyClient {
  #baseUrl;
  #credential;
  #fetch;
  #onCall;
  #credentials;
  #headers;

  /**
   * @param {object} [options]
   * @param {string} [options.baseUrl=""] the proxy's origin (and path prefix); "" for the page's own origin
   * @param {string | (() => string | Promise<string>)} [options.credential] an API key or a JWT, or a
   *   function returning one, called before every request (so a JWT can be refreshed). Without one, no
   *   Authorization header is sent and the proxy answers 401.
   * @param {typeof fetch} [options.fetch=globalThis.fetch] the fetch implementation to use
   * @param {(call: object) => void} [options.onCall] called after every HTTP exchange with
   *   `{method, url, status, requestId, durationMs, ok, problem?}` (status 0 when fetch failed)
   * @param {"omit" | "same-origin" | "include"} [options.credentials="omit"] fetch's cookie mode. "omit"
   *   (default) suits bearer credentials; "same-origin" is for a proxy mounted in a host app on the
   *   page's own origin that authenticates by its session cookie (library mode). Cross-origin cookies
   *   cannot work: the proxy's CORS never allows credentials.
   * @param {Record<string, string>} [options.headers] extra headers on every request, e.g. the CSRF
   *   header a cookie-authenticated host app asks for
   */
  constructor({ baseUrl = "", credential, fetch = globalThis.fetch, onCall, credentials = "omit", headers = {} } = {}) {
    if (!["omit", "same-origin", "include"].includes(credentials)) {
      throw new TypeError('credentials must be "omit", "same-origin" or "include".');
    }
    this.#credentials = credentials;
    this.#headers = { ...headers };
    if (typeof fetch !== "function") throw new TypeError("No fetch implementation available.");
    this.#baseUrl = String(baseUrl).replace(/\/+$/, "");
    this.#credential = credential;
    this.#fetch = (url, init) => fetch(url, init); // unbound, as window.fetch requires
    this.#onCall = onCall;
  }

  async #authorization() {
    const value = typeof this.#credential === "function" ? await this.#credential() : this.#credential;
    if (value == null || value === "") return null;
    if (typeof value !== "string" || !CREDENTIAL_PATTERN.test(value)) {
      throw new TypeError("The credential must be a string of visible ASCII characters without spaces.");
    }
    return `Bearer ${value}`;
  }

  /**
   * One HTTP exchange. `payload` is the JSON body, already serialised (so that retries send the same
   * bytes). `options.timeoutMs` ends the exchange with a RequestTimeoutError when no whole answer came
   * in time; `options.idempotencyKey` is sent as `Idempotency-Key` and named in the call report.
   * @param {string} method
   * @param {string} path
   * @param {string|undefined} payload
   * @param {AbortSignal|undefined} signal
   * @param {{timeoutMs?: number, idempotencyKey?: string}} [options]
   */
  async #request(method, path, payload, signal, { timeoutMs, idempotencyKey } = {}) {
    const url = this.#baseUrl + path;
    const headers = { ...this.#headers, Accept: "application/json, application/problem+json" };
    const authorization = await this.#authorization();
    if (authorization) headers.Authorization = authorization;
    if (idempotencyKey !== undefined) headers["Idempotency-Key"] = idempotencyKey;
    const init = { method, headers, credentials: this.#credentials, cache: "no-store", signal };
    if (payload !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = payload;
    }
    // The attempt's own controller: it follows the caller's signal and also ends at the time limit.
    let attempt = null;
    let timer;
    const forwardAbort = () => attempt.abort(abortReason(signal));
    if (timeoutMs !== undefined) {
      attempt = new AbortController();
      // Aborted while the credential was awaited: the attempt starts aborted, like fetch would.
      if (signal?.aborted) forwardAbort();
      else signal?.addEventListener("abort", forwardAbort, { once: true });
      timer = setTimeout(() => attempt.abort(new DOMException(`No answer within ${timeoutMs} ms.`, "TimeoutError")), timeoutMs);
      init.signal = attempt.signal;
    }
    const report = (fields) => {
      const call = { method, url, ...fields };
      if (idempotencyKey !== undefined) call.idempotencyKey = idempotencyKey;
      return call;
    };
    const started = now();
    let response;
    let text;
    try {
      response = await this.#fetch(url, init);
      text = await response.text();
    } catch (cause) {
      if (signal?.aborted) throw abortReason(signal);
      const timedOut = attempt?.signal.aborted === true;
      const call = report({ status: response?.status ?? 0, requestId: response?.headers.get("X-Request-ID") ?? null,
        durationMs: now() - started, ok: false });
      if (timedOut) call.timedOut = true;
      notify(this.#onCall, call);
      if (timedOut) {
        throw new RequestTimeoutError(`The liveness proxy did not answer within ${timeoutMs} ms (${method} ${url}).`,
          { cause: attempt.signal.reason, timeoutMs });
      }
      throw new NetworkError(`Cannot reach the liveness proxy (${method} ${url}).`, { cause });
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", forwardAbort);
    }
    const requestId = response.headers.get("X-Request-ID");
    const replayed = response.headers.get("Idempotent-Replayed") === "true";
    let parsed;
    try {
      parsed = text === "" ? undefined : JSON.parse(text);
    } catch {
      parsed = undefined;
    }
    const call = report({ status: response.status, requestId, durationMs: now() - started, ok: response.ok });
    if (idempotencyKey !== undefined) call.replayed = replayed;
    if (!response.ok) {
      const isProblem = isPlainObject(parsed) &&
        (typeof parsed.type === "string" || /problem\+json/i.test(response.headers.get("Content-Type") ?? ""));
      const problem = isProblem ? parsed : null;
      call.problem = problem;
      notify(this.#onCall, call);
      throw errorFor({
        status: response.status, problem, requestId, replayed,
        retryAfterSeconds: parseRetryAfter(response.headers.get("Retry-After")),
        detail: problem ? undefined : `The proxy answered HTTP ${response.status} without problem details.`,
      });
    }
    notify(this.#onCall, call);
    if (!isPlainObject(parsed)) {
      throw unexpected(response.status, requestId, `${method} ${path} answered HTTP ${response.status} with a body that is not a JSON object.`);
    }
    return { data: parsed, status: response.status, requestId };
  }

  /**
   * `POST /v1/liveness/session-token`: a one-time session token for the Cynopsis SDK.
   * @param {object} [body] a JSON object passed on to Cynopsis; nothing is sent when omitted
   * @param {{signal?: AbortSignal}} [options]
   * @returns {Promise<object>} `{session_token, expires_in, ...}`
   */
  async getSessionToken(body = undefined, { signal } = {}) {
    if (body !== undefined && !isPlainObject(body)) throw new TypeError("body must be a JSON object.");
    // Never retried here: a retry of a lost answer just yields another token, and the lost one is
    // never used (it expires), so the caller simply asks again.
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const { data, status, requestId } = await this.#request("POST", "/v1/liveness/session-token", payload, signal);
    if (typeof data.session_token !== "string" || data.session_token === "") {
      throw unexpected(status, requestId, "The session-token answer has no session_token.");
    }
    return data;
  }

  /**
   * `POST /v1/liveness/sessions`: creates a liveness session, bound to this caller's subject.
   *
   * Every call sends an `Idempotency-Key` (a fresh one unless `idempotencyKey` is given), and a lost
   * answer is asked for again with the same key and the same body, so that the proxy replays what the
   * first request got instead of spending a second attempt (or refusing the session token it used):
   * - a network error, or no answer within `timeoutMs`: retried;
   * - 429, 502, 503, 504: retried, unless replayed (`Idempotent-Replayed: true`: the final answer for
   *   the key) or their Retry-After asks for longer than `maxDelayMs` (a daily cap, an open circuit:
   *   thrown at once, for the UI to say so);
   * - 409 `idempotency-key-in-flight` (an earlier attempt still at work in the proxy): waited out, as
   *   Retry-After says, for up to a minute; these waits use no retry;
   * - any other answer (400, 401, 404, 422, 500, ...) is thrown at once.
   * Retries wait 250 ms, then twice as long each time (jittered, at most `maxDelayMs`), never less
   * than Retry-After. When none is left, the last error is thrown.
   * @param {object} body a JSON object, e.g. `{session_token}`
   * @param {object} [options]
   * @param {AbortSignal} [options.signal] aborting rejects at once (also while waiting to retry) with
   *   the signal's reason, and nothing more is sent; `AbortSignal.timeout(ms)` bounds the whole call
   * @param {string} [options.idempotencyKey] 1-64 characters of A-Za-z0-9_-; default a fresh
   *   `newIdempotencyKey()`. Pass the same one (with the same body) to try again later what this call
   *   gave up on.
   * @param {number} [options.timeoutMs=25000] the limit of one attempt (a RequestTimeoutError when it
   *   passes). Longer than the proxy takes at worst with its default timeouts, so that a timeout means
   *   a lost answer rather than a slow Cynopsis.
   * @param {number} [options.retries=3] how many times a failed attempt is retried (0: never)
   * @param {number} [options.maxDelayMs=5000] the longest wait before a retry
   * @param {(retry: object) => void} [options.onRetry] before each wait for a retry:
   *   `{attempt, error, delayMs, idempotencyKey}` (`attempt` is the one that failed, 1 for the first)
   * @returns {Promise<object>} `{session_id, status, expires_in, ...}`
   */
  async createSession(body, { signal, idempotencyKey, timeoutMs = 25000, retries = 3, maxDelayMs = 5000, onRetry } = {}) {
    if (!isPlainObject(body)) throw new TypeError("body must be a JSON object, e.g. {session_token}.");
    const key = idempotencyKey ?? newIdempotencyKey();
    if (typeof key !== "string" || !IDEMPOTENCY_KEY_PATTERN.test(key)) {
      throw new TypeError("idempotencyKey must be 1-64 characters of A-Za-z0-9_-.");
    }
    if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) throw new TypeError("timeoutMs must be a positive number.");
    if (!Number.isInteger(retries) || retries < 0) throw new TypeError("retries must be a non-negative integer.");
    if (!Number.isFinite(maxDelayMs) || maxDelayMs < 0) throw new TypeError("maxDelayMs must be a non-negative number.");
    if (signal?.aborted) throw abortReason(signal);
    // Serialised once: the proxy replays an answer only to the same body under the same key.
    const payload = JSON.stringify(body);
    let backoff = RETRY_INITIAL_DELAY_MS;
    let retried = 0;
    let inFlightSince = null;
    for (let attempt = 1; ; attempt += 1) {
      let error;
      try {
        const { data, status, requestId } = await this.#request("POST", "/v1/liveness/sessions", payload, signal,
          { timeoutMs, idempotencyKey: key });
        if (typeof data.session_id !== "string" || !SESSION_ID_PATTERN.test(data.session_id)) {
          throw unexpected(status, requestId, "The create-session answer has no usable session_id.");
        }
        return data;
      } catch (caught) {
        if (signal?.aborted) throw abortReason(signal);
        error = caught;
      }
      const retryAfterMs = (error.retryAfterSeconds ?? 0) * 1000;
      let delayMs;
      if (isKeyInFlight(error)) {
        inFlightSince ??= now();
        delayMs = Math.max(MIN_DELAY_MS, retryAfterMs);
        if (retryAfterMs > maxDelayMs || now() + delayMs - inFlightSince > IN_FLIGHT_WAIT_MS) throw error;
      } else {
        if (!isRetriableCreateFailure(error) || retried >= retries || retryAfterMs > maxDelayMs) throw error;
        retried += 1;
        const jittered = backoff / 2 + Math.random() * (backoff / 2);
        backoff = Math.min(backoff * BACKOFF_FACTOR, Math.max(1, maxDelayMs));
        delayMs = Math.max(MIN_DELAY_MS, Math.min(jittered, maxDelayMs), retryAfterMs);
      }
      notify(onRetry, { attempt, error, delayMs, idempotencyKey: key });
      await sleep(delayMs, signal);
    }
  }

  /**
   * `GET /v1/liveness/sessions/{sessionId}/result`: one read of the session's result.
   * @param {string} sessionId 1-128 characters of A-Za-z0-9_-
   * @param {{signal?: AbortSignal}} [options]
   * @returns {Promise<object>} `{session_id, status, confidence, redacted_fields, passed?, ...}`
   */
  async getResult(sessionId, { signal } = {}) {
    checkSessionId(sessionId);
    const path = `/v1/liveness/sessions/${encodeURIComponent(sessionId)}/result`;
    const { data, status, requestId } = await this.#request("GET", path, undefined, signal);
    if (typeof data.status !== "string") {
      throw unexpected(status, requestId, "The result has no status.");
    }
    return data;
  }

  /**
   * Reads the result until its status is terminal, with exponential backoff and jitter. 429, 502, 503,
   * 504 and network errors are retried (never sooner than their Retry-After); any other error is thrown
   * at once.
   * @param {string} sessionId
   * @param {object} [options]
   * @param {number} [options.timeoutMs=120000] give up (LivenessTimeoutError) after this long
   * @param {AbortSignal} [options.signal] aborting rejects at once with the signal's reason
   * @param {number} [options.initialDelayMs=500] the first backoff delay
   * @param {number} [options.maxDelayMs=5000] the largest backoff delay (Retry-After may exceed it)
   * @param {(progress: object) => void} [options.onProgress] after every read:
   *   `{attempt, status, elapsedMs, nextDelayMs, error?}` (`status` null and `error` set when the read
   *   failed and will be retried; `nextDelayMs` null when no further read follows)
   * @returns {Promise<object>} the terminal result
   */
  async waitForResult(sessionId, { timeoutMs = 120000, signal, initialDelayMs = 500, maxDelayMs = 5000, onProgress } = {}) {
    checkSessionId(sessionId);
    for (const [name, value] of Object.entries({ timeoutMs, initialDelayMs, maxDelayMs })) {
      if (!Number.isFinite(value) || value < 0) throw new TypeError(`${name} must be a non-negative number.`);
    }
    if (signal?.aborted) throw abortReason(signal);
    const started = now();
    const deadline = started + timeoutMs;
    let backoff = Math.max(1, initialDelayMs);
    let lastStatus = null;
    let lastError;
    let attempts = 0;
    const timeout = () => new LivenessTimeoutError(sessionId, { lastStatus, attempts, timeoutMs, cause: lastError });
    for (let attempt = 1; ; attempt += 1) {
      attempts = attempt;
      let result = null;
      let error;
      // Each read ends at the deadline too: one stalled request must not hold the caller past it.
      const read = new AbortController();
      const forwardAbort = () => read.abort(abortReason(signal));
      signal?.addEventListener("abort", forwardAbort, { once: true });
      const readTimer = setTimeout(() => read.abort(new DOMException("The deadline passed.", "TimeoutError")),
        Math.max(0, deadline - now()));
      try {
        result = await this.getResult(sessionId, { signal: read.signal });
        lastStatus = result.status;
      } catch (caught) {
        if (signal?.aborted) throw abortReason(signal);
        if (read.signal.aborted) throw timeout();
        if (!isTransient(caught)) throw caught;
        error = lastError = caught;
      } finally {
        clearTimeout(readTimer);
        signal?.removeEventListener("abort", forwardAbort);
      }
      const progress = { attempt, status: result ? result.status : null, elapsedMs: now() - started, nextDelayMs: null };
      if (error) progress.error = error;
      if (result && isTerminalStatus(result.status)) {
        notify(onProgress, progress);
        return result;
      }
      const remaining = deadline - now();
      const jittered = backoff / 2 + Math.random() * (backoff / 2);
      backoff = Math.min(backoff * BACKOFF_FACTOR, Math.max(1, maxDelayMs));
      const retryAfterMs = (error?.retryAfterSeconds ?? 0) * 1000;
      const delay = Math.max(MIN_DELAY_MS, Math.min(jittered, maxDelayMs), retryAfterMs);
      // Out of time, or told not to ask again before the deadline: say so now rather than sit idle.
      if (remaining <= 0 || retryAfterMs >= remaining) {
        notify(onProgress, progress);
        throw timeout();
      }
      progress.nextDelayMs = Math.min(delay, remaining);
      notify(onProgress, progress);
      await sleep(progress.nextDelayMs, signal);
    }
  }
}
