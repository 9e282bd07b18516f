// Type declarations of liveness-proxy-client.js (served at /client/liveness-proxy-client.js).

/** A status the proxy passes on from Cynopsis; SUCCEEDED, FAILED and EXPIRED are terminal, any other string is not. */
export type LivenessStatus = "CREATED" | "SUCCEEDED" | "FAILED" | "EXPIRED" | (string & {});

/** An API key or a JWT, or a function returning one, called before every request. */
export type Credential = string | (() => string | Promise<string>);

/** RFC 9457 problem details, as the proxy renders them. */
export interface Problem {
  /** "urn:liveness-proxy:problem:<slug>" */
  type: string;
  title: string;
  status: number;
  detail: string;
  request_id: string;
  /** The limit that was hit, on `rate-limited`: "session_token", "create_session", "result", "daily_attempts". */
  limit?: string;
  [extension: string]: unknown;
}

/** `POST /v1/liveness/session-token` (200). */
export interface SessionTokenResponse {
  /** One-time token for the Cynopsis SDK. */
  session_token: string;
  /** Seconds. */
  expires_in?: number;
  [key: string]: unknown;
}

/** `POST /v1/liveness/sessions` (201). */
export interface CreateSessionResponse {
  session_id: string;
  status?: LivenessStatus;
  /** Seconds. */
  expires_in?: number;
  [key: string]: unknown;
}

/** The body sent to `POST /v1/liveness/sessions`. */
export interface CreateSessionRequest {
  session_token?: string;
  [key: string]: unknown;
}

/** `GET /v1/liveness/sessions/{id}/result` (200), biometric fields removed. */
export interface LivenessResult {
  session_id?: string | null;
  status: LivenessStatus;
  /** 0-100, null while not finished. */
  confidence?: number | null;
  /** The biometric fields the proxy removed, e.g. ["reference_image", "audit_images"]. */
  redacted_fields?: string[] | null;
  /** Only when the proxy has a pass threshold configured; null while not finished. */
  passed?: boolean | null;
  [key: string]: unknown;
}

/** What `onCall` receives after every HTTP exchange. Never holds the credential. */
export interface CallReport {
  method: "GET" | "POST";
  url: string;
  /** 0 when fetch itself failed. */
  status: number;
  /** The X-Request-ID response header. */
  requestId: string | null;
  durationMs: number;
  ok: boolean;
  /** On a non-2xx answer: the parsed problem body, or null if it was not problem JSON. */
  problem?: Problem | null;
  /** `POST /v1/liveness/sessions` only: the Idempotency-Key sent. */
  idempotencyKey?: string;
  /** `POST /v1/liveness/sessions` only, when an answer came: its `Idempotent-Replayed: true` header. */
  replayed?: boolean;
  /** true when the attempt ran out of createSession's `timeoutMs` (status 0 then). */
  timedOut?: boolean;
}

export interface ClientOptions {
  /** The proxy's origin and path prefix; "" (default) for the page's own origin. A trailing slash is ignored. */
  baseUrl?: string;
  /** Without one, no Authorization header is sent (the proxy answers 401). */
  credential?: Credential;
  /** Default: globalThis.fetch. */
  fetch?: typeof globalThis.fetch;
  /** Called after every HTTP exchange; an exception thrown here does not break the call. */
  onCall?: (call: CallReport) => void;
  /**
   * fetch's cookie mode. "omit" (default) suits bearer credentials; "same-origin" is for a proxy
   * mounted in a host app on the page's own origin that authenticates by its session cookie (library
   * mode). Cross-origin cookies cannot work: the proxy's CORS never allows credentials.
   */
  credentials?: "omit" | "same-origin" | "include";
  /** Extra headers on every request, e.g. the CSRF header a cookie-authenticated host app asks for. */
  headers?: Record<string, string>;
}

export interface RequestOptions {
  /** Aborts the request; the promise then rejects with the signal's reason. */
  signal?: AbortSignal;
}

export interface CreateSessionOptions extends RequestOptions {
  /**
   * Sent as `Idempotency-Key`, the same on every retry: 1-64 characters of A-Za-z0-9_-. Default: a
   * fresh `newIdempotencyKey()` per call. Pass the same key with the same body to try again later
   * what a call gave up on, without the risk of a second session.
   */
  idempotencyKey?: string;
  /** The limit of one attempt, in ms (a RequestTimeoutError when it passes). Default 25000. */
  timeoutMs?: number;
  /** How many times a failed attempt is retried; 0: never. Default 3. */
  retries?: number;
  /** The longest wait before a retry; an answer whose Retry-After asks for longer is thrown at once. Default 5000. */
  maxDelayMs?: number;
  /** Called before each wait for a retry; an exception thrown here does not stop the call. */
  onRetry?: (retry: CreateRetry) => void;
}

export interface CreateRetry {
  /** The attempt that failed, 1 for the first. */
  attempt: number;
  /**
   * Why: a network error or a timeout, a 429/502/503/504 that was not replayed, or a 409
   * `idempotency-key-in-flight` (an earlier attempt still at work in the proxy).
   */
  error: NetworkError | RateLimitedError | UpstreamUnavailableError | LivenessProxyError;
  /** The wait before the next attempt, in ms. */
  delayMs: number;
  idempotencyKey: string;
}

export interface WaitProgress {
  /** 1 for the first read. */
  attempt: number;
  /** The status read; null when the read failed and will be retried. */
  status: LivenessStatus | null;
  elapsedMs: number;
  /** The wait before the next read; null when no further read follows. */
  nextDelayMs: number | null;
  /** The retried error (429, 502, 503, 504 or network), when the read failed. */
  error?: RateLimitedError | UpstreamUnavailableError | NetworkError;
}

export interface WaitOptions {
  /** Default 120000. */
  timeoutMs?: number;
  /** Aborting rejects at once (also during a pending wait) with the signal's reason, or an "AbortError" DOMException. */
  signal?: AbortSignal;
  /** Default 500. */
  initialDelayMs?: number;
  /** Default 5000. A Retry-After may exceed it. */
  maxDelayMs?: number;
  /** Called after every read; an exception thrown here does not stop the wait. */
  onProgress?: (progress: WaitProgress) => void;
}

/** `SUCCEEDED`, `FAILED` and `EXPIRED` are terminal (the statuses the proxy records a verdict for); any other status is not. */
export function isTerminalStatus(status: unknown): boolean;

/** A fresh Idempotency-Key: `crypto.randomUUID()` where there is one, else 128 random bits in hex. */
export function newIdempotencyKey(): string;

export interface LivenessProxyErrorInit {
  status: number;
  problem?: Problem | null;
  requestId?: string | null;
  retryAfterSeconds?: number | null;
  type?: string | null;
  title?: string;
  detail?: string;
  replayed?: boolean;
}

/** Any non-2xx answer of the proxy, and a 2xx answer whose body is not what was expected. */
export class LivenessProxyError extends Error {
  constructor(init: LivenessProxyErrorInit);
  /** The HTTP status. */
  readonly status: number;
  /** The problem `type` URI, or null. */
  readonly type: string | null;
  /** The part of `type` after "urn:liveness-proxy:problem:" (e.g. "rate-limited"), or null. */
  readonly slug: string | null;
  readonly title: string;
  readonly detail: string;
  /** The problem's request_id, else the X-Request-ID header. */
  readonly requestId: string | null;
  /** From the Retry-After header. */
  readonly retryAfterSeconds: number | null;
  /** The parsed problem body, or null if the body was not problem JSON. */
  readonly problem: Problem | null;
  /**
   * The answer carried `Idempotent-Replayed: true`: the stored outcome of an earlier create with the
   * same Idempotency-Key, which every retry with that key gets again.
   */
  readonly replayed: boolean;
}

/** 429: `rate-limited` (the proxy's per-subject limits) or `upstream-rate-limited` (Cynopsis). */
export class RateLimitedError extends LivenessProxyError {
  /** The limit that was hit, from the problem's `limit` member, e.g. "daily_attempts". */
  readonly limit: string | null;
}

/** 401. */
export class AuthenticationError extends LivenessProxyError {}

/** 502, 503 or 504. */
export class UpstreamUnavailableError extends LivenessProxyError {}

export interface LivenessTimeoutInfo {
  lastStatus?: string | null;
  attempts?: number;
  timeoutMs?: number;
  /** The last retried error, if any. */
  cause?: unknown;
}

/** `waitForResult` reached its deadline without a terminal status. */
export class LivenessTimeoutError extends Error {
  constructor(sessionId: string, info?: LivenessTimeoutInfo);
  readonly sessionId: string;
  /** The last status read, or null if no read succeeded. */
  readonly lastStatus: string | null;
  /** The number of reads made. */
  readonly attempts: number;
}

/** fetch itself failed (offline, DNS, TLS, CORS). */
export class NetworkError extends Error {
  constructor(message: string, options?: { cause?: unknown });
  /** What fetch threw. */
  readonly cause: unknown;
}

/** No answer within createSession's per-attempt `timeoutMs`; the request may or may not have reached the proxy. */
export class RequestTimeoutError extends NetworkError {
  constructor(message: string, options?: { cause?: unknown; timeoutMs?: number });
  /** The limit that passed, in ms. */
  readonly timeoutMs: number | undefined;
}

export class LivenessProxyClient {
  constructor(options?: ClientOptions);
  /** POST /v1/liveness/session-token; no body is sent when `body` is omitted. */
  getSessionToken(body?: Record<string, unknown>, options?: RequestOptions): Promise<SessionTokenResponse>;
  /**
   * POST /v1/liveness/sessions, with an Idempotency-Key. Network errors, timeouts and 429/502/503/504
   * answers that were not replayed are retried with the same key and body (jittered backoff from 250 ms,
   * never sooner than Retry-After); a 409 `idempotency-key-in-flight` is waited out for up to a minute;
   * any other error is thrown at once.
   */
  createSession(body: CreateSessionRequest, options?: CreateSessionOptions): Promise<CreateSessionResponse>;
  /** GET /v1/liveness/sessions/{sessionId}/result, once. Throws TypeError for a malformed id. */
  getResult(sessionId: string, options?: RequestOptions): Promise<LivenessResult>;
  /** Polls getResult until the status is terminal; retries 429/502/503/504/network errors. */
  waitForResult(sessionId: string, options?: WaitOptions): Promise<LivenessResult>;
}
