// The liveness-proxy demo page. Plain ES module; runs under a CSP without inline scripts or styles,
// so the page changes only text, classes and the `hidden` attribute. Server data goes into
// textContent only, never into HTML.

import {
  AuthenticationError,
  LivenessProxyClient,
  LivenessProxyError,
  LivenessTimeoutError,
  NetworkError,
  RateLimitedError,
  UpstreamUnavailableError,
} from "/client/liveness-proxy-client.js";

const WAIT_TIMEOUT_MS = 60000;
const BOOKKEEPING_PATHS = ["/demo/api/upstream-calls", "/demo/api/leak-check", "/demo/api/webhooks"];
// The backend's list of received webhooks is polled: every second, every 5 s after a failure.
const WEBHOOK_POLL_MS = 1000;
const WEBHOOK_RETRY_MS = 5000;

const $ = (id) => {
  const element = document.getElementById(id);
  if (!element) throw new Error(`The page has no #${id}.`);
  return element;
};

const state = {
  config: { subject: "demo-user", sandbox_url: null, token_lifetime_seconds: null, capture_delay_seconds: 2 },
  accessToken: null,
  accessTokenExpiresAt: 0,
  subject: null,
  sessionToken: null,
  sessionId: null,
  result: null,
  waitController: null,
  running: 0, // actions in flight; the body is "busy" while > 0
  step: null, // the step action in flight, if any (steps run one at a time)
  generation: 0, // bumped by "Start over": late answers of an older run are dropped
  received: [], // every response text this page got, for the leak check
  // The leak check runs on what is new since the last one: a secret or image that exists only later
  // cannot be in an earlier answer, so the totals below stay a check of everything received.
  leakChecked: 0,
  leakItems: 0,
  leakBytes: 0,
  leakFound: new Set(),
  upstreamNext: 0,
  upstreamRefresh: null,
  outagePending: false,
  expiryTimer: null,
  // What the demo's backend received: `after` is the last event listed, `run` names the server run
  // (a restart starts its numbering again), `bySession` the latest event per session id.
  webhooks: { after: 0, run: null, lastText: null, bySession: new Map() },
};

// ---- Everything this page receives passes through here --------------------------------------------

async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  const path = new URL(typeof input === "string" ? input : input.url, location.href).pathname;
  if (path !== "/demo/api/leak-check") {
    try {
      recordReceived(response, await response.clone().text());
    } catch {
      // A body that cannot be read is not in the browser's hands either.
    }
  }
  return response;
}

function recordReceived(response, text) {
  const head = [`HTTP ${response.status} ${response.statusText}`];
  for (const [name, value] of response.headers) head.push(`${name}: ${value}`);
  state.received.push(`${head.join("\n")}\n\n${text}`);
}

function recordBrowserCall({ method, url, status, requestId }) {
  const path = new URL(url, location.href);
  if (BOOKKEEPING_PATHS.includes(path.pathname)) return;
  const row = document.createElement("tr");
  const statusClass = status >= 200 && status < 300 ? "status--ok" : "status--error";
  addCell(row, method);
  addCell(row, path.pathname + path.search, "mono");
  addCell(row, status === 0 ? "no answer" : String(status), statusClass);
  addCell(row, requestId ?? "—", "mono");
  $("browser-calls").append(row);
  $("browser-calls-empty").hidden = true;
}

function addCell(row, text, className) {
  const cell = document.createElement("td");
  cell.textContent = text;
  if (className) cell.className = className;
  row.append(cell);
}

const client = new LivenessProxyClient({
  baseUrl: "",
  credential: () => state.accessToken ?? "",
  fetch: recordingFetch,
  onCall: recordBrowserCall,
});

// The demo server's own API: same error shape as the proxy, so the same error classes.
async function demoApi(method, path, body) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const started = performance.now();
  let response;
  let text;
  try {
    response = await recordingFetch(path, init);
    text = await response.text();
  } catch (cause) {
    recordBrowserCall({ method, url: path, status: 0, requestId: null });
    throw new NetworkError(`Cannot reach the demo server (${method} ${path}).`, { cause });
  }
  const requestId = response.headers.get("X-Request-ID");
  recordBrowserCall({ method, url: path, status: response.status, requestId, durationMs: performance.now() - started });
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const problem = data && typeof data === "object" && !Array.isArray(data) ? data : null;
    const retryAfter = response.headers.get("Retry-After");
    const init = {
      status: response.status, problem, requestId,
      retryAfterSeconds: retryAfter && /^\d+$/.test(retryAfter.trim()) ? Number(retryAfter) : null,
      detail: problem ? undefined : `The demo server answered HTTP ${response.status}.`,
    };
    const { status } = response;
    if (status === 401) throw new AuthenticationError(init);
    if (status === 429) throw new RateLimitedError(init);
    if (status === 502 || status === 503 || status === 504) throw new UpstreamUnavailableError(init);
    throw new LivenessProxyError(init);
  }
  return data;
}

// ---- Errors, written for a person ------------------------------------------------------------------

function isAbort(error) {
  return error?.name === "AbortError";
}

function messageFor(error, context) {
  if (error instanceof RateLimitedError) {
    if (error.limit === "daily_attempts") return "You have used today's liveness attempts for this user.";
    return error.retryAfterSeconds != null
      ? `Too many attempts. You can try again in ${error.retryAfterSeconds} seconds.`
      : "Too many attempts. Try again in a moment.";
  }
  if (error instanceof AuthenticationError) return "Your sign-in expired. Sign in again.";
  if (error instanceof UpstreamUnavailableError) {
    const base = "The liveness service is not reachable right now. Nothing was lost; try again in a moment.";
    return error.retryAfterSeconds != null ? `${base} (The proxy suggests waiting ${error.retryAfterSeconds} seconds.)` : base;
  }
  if (context === "create-session" && error instanceof LivenessProxyError) {
    if (error.status === 410) return "The session token expired. Get a new one.";
    if (error.status === 409) return "This session token was already used. Get a new one.";
    if (error.slug === "upstream-rejected") return "Cynopsis refused this session token. Get a new one.";
  }
  if (error instanceof LivenessTimeoutError) {
    const seconds = Math.round(WAIT_TIMEOUT_MS / 1000);
    const why = error.cause instanceof UpstreamUnavailableError ? " The liveness service was not reachable." : "";
    return `No result yet after ${seconds} s.${why}`;
  }
  if (error instanceof NetworkError) return "Cannot reach the proxy.";
  if (error instanceof LivenessProxyError) {
    return error.detail && error.detail !== error.title ? `${error.title}: ${error.detail}` : error.title;
  }
  return `Something went wrong in this page: ${error?.message ?? String(error)}`;
}

function showError(error, context) {
  $("error-message").textContent = messageFor(error, context);
  const requestId = error?.requestId ?? error?.cause?.requestId ?? null;
  const idLine = document.querySelector('[data-testid="error-request-id"]');
  idLine.textContent = requestId ? `Request id: ${requestId}` : "";
  idLine.hidden = !requestId;
  document.querySelector('[data-testid="error"]').hidden = false;
}

function clearError() {
  $("error-message").textContent = "";
  const idLine = document.querySelector('[data-testid="error-request-id"]');
  idLine.textContent = "";
  idLine.hidden = true;
  document.querySelector('[data-testid="error"]').hidden = true;
}

// ---- Running actions -------------------------------------------------------------------------------

// Runs one user action: busy state, one error region, then the panels are brought up to date.
async function run(name, work, { isStep = true } = {}) {
  if (isStep && state.step) return;
  state.running += 1;
  if (isStep) state.step = name;
  document.body.dataset.state = "busy";
  clearError();
  render();
  try {
    await work();
  } catch (error) {
    if (!isAbort(error)) showError(error, name);
  } finally {
    if (isStep) state.step = null;
    render();
    try {
      await refreshPanels();
    } finally {
      state.running -= 1;
      render();
      if (state.running === 0) document.body.dataset.state = "idle";
    }
  }
}

async function refreshPanels() {
  await refreshUpstreamCalls();
  await runLeakCheck();
}

function refreshUpstreamCalls() {
  // One refresh at a time; a call made while one runs joins it.
  if (!state.upstreamRefresh) {
    state.upstreamRefresh = loadUpstreamCalls().finally(() => { state.upstreamRefresh = null; });
  }
  return state.upstreamRefresh;
}

async function loadUpstreamCalls() {
  let data;
  try {
    data = await demoApi("GET", `/demo/api/upstream-calls?after=${encodeURIComponent(state.upstreamNext)}`);
  } catch {
    return; // a teaching panel: its failure must not hide the step's own outcome
  }
  const body = $("upstream-calls");
  for (const call of Array.isArray(data?.calls) ? data.calls : []) {
    const row = document.createElement("tr");
    addCell(row, String(call.index ?? ""));
    addCell(row, String(call.method ?? ""));
    addCell(row, String(call.path ?? ""), "mono");
    addCell(row, String(call.asked_by ?? ""));
    addCell(row, String(call.credential ?? ""));
    addCell(row, call.domain_id == null ? "—" : String(call.domain_id), "mono");
    body.append(row);
  }
  if (body.rows.length) $("upstream-calls-empty").hidden = true;
  if (Number.isInteger(data?.next)) state.upstreamNext = data.next;
}

async function runLeakCheck() {
  const element = $("leak-check");
  const upTo = state.received.length;
  let data;
  try {
    data = await demoApi("POST", "/demo/api/leak-check", { received: state.received.slice(state.leakChecked, upTo) });
  } catch {
    element.textContent = "The leak check could not run.";
    delete element.dataset.clean;
    return;
  }
  state.leakChecked = upTo;
  state.leakItems += Number(data?.checked_items) || 0;
  state.leakBytes += Number(data?.checked_bytes) || 0;
  for (const label of Array.isArray(data?.found) ? data.found : []) state.leakFound.add(String(label));
  const found = [...state.leakFound];
  const items = state.leakItems;
  const bytes = state.leakBytes;
  const lookedFor = Array.isArray(data?.looked_for) ? data.looked_for.map(String) : [];
  if (found.length === 0) {
    const webhookSecret = lookedFor.includes("the webhook signing secret") ? ", no webhook signing secret" : "";
    element.textContent = `Checked ${items} responses (${bytes} bytes): no client secret, no Cynopsis access token${webhookSecret}, no face image.`;
    element.dataset.clean = "true";
  } else {
    element.textContent = `Warning: checked ${items} responses (${bytes} bytes) and found ${found.join(", ")} in what reached this browser.`;
    element.dataset.clean = "false";
  }
  const lookedForLine = $("leak-looked-for");
  lookedForLine.textContent = lookedFor.length ? `Looked for: ${lookedFor.join(", ")}.` : "";
  lookedForLine.hidden = lookedFor.length === 0;
}

// ---- Steps ----------------------------------------------------------------------------------------

function decodeJwtClaims(jwt) {
  try {
    const part = String(jwt).split(".")[1] ?? "";
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

function claimText(value) {
  if (value == null) return "—";
  return Array.isArray(value) ? value.join(", ") : String(value);
}

async function signIn() {
  const data = await demoApi("POST", "/demo/api/sign-in", {});
  if (typeof data?.access_token !== "string") throw new Error("The demo identity provider sent no access token.");
  state.accessToken = data.access_token;
  const claims = decodeJwtClaims(data.access_token) ?? {};
  const lifetime = Number(data.expires_in) || (Number(claims.exp) ? claims.exp - Date.now() / 1000 : 0);
  state.accessTokenExpiresAt = Date.now() + lifetime * 1000;
  state.subject = String(data.subject ?? claims.sub ?? state.config.subject);

  const signedIn = $("signed-in");
  signedIn.textContent = `Signed in as ${state.subject}. The page holds a JWT in memory (not in storage).`;
  signedIn.hidden = false;
  $("claim-sub").textContent = claimText(claims.sub);
  $("claim-iss").textContent = claimText(claims.iss);
  $("claim-aud").textContent = claimText(claims.aud);
  $("claim-exp").textContent = Number.isFinite(claims.exp)
    ? `${claims.exp} (${new Date(claims.exp * 1000).toLocaleTimeString()})`
    : claimText(claims.exp);
  $("claims").hidden = false;
  showExpiry();
  clearInterval(state.expiryTimer);
  state.expiryTimer = setInterval(showExpiry, 1000);
}

function showExpiry() {
  const line = $("token-expiry");
  const seconds = Math.round((state.accessTokenExpiresAt - Date.now()) / 1000);
  line.textContent = seconds > 0
    ? `The JWT expires in ${seconds} s; then the proxy answers 401 and you sign in again.`
    : "The JWT has expired. Sign in again.";
  line.hidden = false;
  if (seconds <= 0) clearInterval(state.expiryTimer);
}

async function getToken() {
  const generation = state.generation;
  const data = await client.getSessionToken();
  if (generation !== state.generation) return;
  state.sessionToken = data.session_token;
  $("session-token").textContent = `${data.session_token.slice(0, 8)}…`;
  $("token-lifetime").textContent = Number.isFinite(data.expires_in)
    ? `It expires in ${data.expires_in} s and works once: it is what the Cynopsis SDK needs to start a capture.`
    : "It works once: it is what the Cynopsis SDK needs to start a capture.";
  $("token-output").hidden = false;
}

async function createSession() {
  const generation = state.generation;
  const token = state.sessionToken;
  try {
    const data = await client.createSession({ session_token: token });
    if (generation !== state.generation) return;
    state.sessionId = data.session_id;
  } catch (error) {
    // A refused token (used, expired, unknown) is spent: the user has to get a new one.
    if (generation === state.generation && error instanceof LivenessProxyError && error.status >= 400 && error.status < 500
        && !(error instanceof RateLimitedError) && !(error instanceof AuthenticationError)) {
      state.sessionToken = null;
    }
    throw error;
  }
  state.sessionToken = null; // single use
  showBackendLine();
  $("session-id").textContent = state.sessionId;
  $("session-subject").textContent = state.subject ?? state.config.subject;
  $("session-output").hidden = false;
}

async function capture(outcome) {
  const generation = state.generation;
  const sessionId = state.sessionId;
  const path = `/demo/api/sessions/${encodeURIComponent(sessionId)}`;
  const output = $("capture-output");
  let text;
  if (outcome === "expire") {
    await demoApi("POST", `${path}/expire`, {});
    text = "Cynopsis expired the session. Asking the proxy for the result…";
  } else {
    const delay = Number(state.config.capture_delay_seconds) || 2;
    const data = await demoApi("POST", `${path}/capture`, { outcome, delay_seconds: delay });
    const inSeconds = data?.completes_in_seconds ?? delay;
    text = outcome === "live"
      ? `A live person is in front of the camera. Cynopsis finishes in ${inSeconds} s.`
      : `Someone holds up a photo of a photo. Cynopsis finishes in ${inSeconds} s.`;
  }
  if (generation !== state.generation) return;
  output.textContent = text;
  output.hidden = false;

  const controller = new AbortController();
  state.waitController = controller;
  $("progress-text").textContent = "Waiting for the result…";
  render();
  try {
    const result = await client.waitForResult(sessionId, {
      timeoutMs: WAIT_TIMEOUT_MS,
      signal: controller.signal,
      onProgress: (progress) => showProgress(progress, generation),
    });
    if (generation !== state.generation) return;
    state.result = result;
    showVerdict(result);
  } catch (error) {
    if (isAbort(error) && generation === state.generation) {
      output.textContent = "You stopped waiting. The session is still open: simulate a capture again, or start over.";
    }
    throw error;
  } finally {
    if (state.waitController === controller) state.waitController = null;
  }
}

function showProgress({ attempt, status, elapsedMs, nextDelayMs, error }, generation) {
  if (generation !== state.generation) return;
  const seconds = (elapsedMs / 1000).toFixed(1);
  const what = error ? "the liveness service did not answer" : `status ${status}`;
  const next = nextDelayMs != null ? `; next check in ${(nextDelayMs / 1000).toFixed(1)} s` : "";
  $("progress-text").textContent = `Waiting for the result… check ${attempt}, ${what}, ${seconds} s${next}`;
  if (error) showError(error, "wait");
  else clearError();
  refreshUpstreamCalls();
}

function showVerdict(result) {
  const box = $("verdict-box");
  const verdict = $("verdict");
  const confidence = $("confidence");
  box.classList.remove("verdict--pass", "verdict--fail", "verdict--expired");
  if (result.status === "SUCCEEDED" && result.passed !== false) {
    verdict.textContent = "Passed — live person";
    box.classList.add("verdict--pass");
  } else if (result.status === "SUCCEEDED") {
    verdict.textContent = "Failed — a live person, but the confidence is below the pass threshold";
    box.classList.add("verdict--fail");
  } else if (result.status === "FAILED") {
    verdict.textContent = "Failed — spoof detected";
    box.classList.add("verdict--fail");
  } else if (result.status === "EXPIRED") {
    verdict.textContent = "The session expired before a capture finished. Start again.";
    box.classList.add("verdict--expired");
  } else {
    verdict.textContent = `The session finished with status ${result.status}.`;
  }
  const value = Number(result.confidence);
  const hasConfidence = result.confidence != null && Number.isFinite(value);
  confidence.textContent = hasConfidence ? `Confidence ${value.toFixed(1)} %` : "";
  confidence.hidden = !hasConfidence;
  const redacted = $("redacted");
  const fields = Array.isArray(result.redacted_fields) ? result.redacted_fields.map(String) : [];
  redacted.textContent = fields.length
    ? `Face images removed by the proxy: ${fields.join(", ")}.`
    : "The proxy removed nothing from this result.";
  redacted.hidden = false;
}

function startOver() {
  state.generation += 1;
  state.waitController?.abort();
  state.waitController = null;
  state.sessionToken = null;
  state.sessionId = null;
  state.result = null;
  clearError();
  for (const id of ["token-output", "session-output", "capture-output", "confidence", "redacted", "verdict-webhook"]) {
    $(id).hidden = true;
  }
  for (const id of ["session-token", "token-lifetime", "session-id", "capture-output", "confidence", "redacted", "verdict-webhook"]) {
    $(id).textContent = "";
  }
  $("verdict").textContent = "No verdict yet.";
  $("verdict-box").classList.remove("verdict--pass", "verdict--fail", "verdict--expired");
  render();
  $("get-token").focus();
}

async function setOutage(enabled) {
  const toggle = $("outage-toggle");
  const status = $("outage-status");
  state.outagePending = true;
  render();
  try {
    const data = await demoApi("POST", "/demo/api/upstream-outage", { enabled });
    toggle.checked = Boolean(data?.enabled ?? enabled);
  } catch (error) {
    toggle.checked = !enabled;
    throw error;
  } finally {
    state.outagePending = false;
  }
  status.textContent = toggle.checked
    ? "Outage on: Cynopsis answers 503 to every liveness call."
    : "Outage off: Cynopsis answers normally.";
}

// ---- The customer's backend: the webhooks it received ----------------------------------------------

function describeWebhook(event) {
  const parts = [String(event.type ?? "an event")];
  if (event.status != null) {
    const confidence = Number(event.confidence);
    parts.push(event.confidence != null && Number.isFinite(confidence)
      ? `${event.status} ${confidence.toFixed(1)}` : String(event.status));
  } else {
    parts.push("no verdict");
  }
  if (event.passed === true) parts.push("passed");
  if (event.passed === false) parts.push("not passed");
  parts.push(event.signature_verified === true ? "signature verified ✓" : "signature NOT verified");
  return parts.join(" — ");
}

function showWebhook(event) {
  const item = document.createElement("li");
  item.dataset.sessionId = String(event.session_id ?? "");
  const line = document.createElement("p");
  line.className = "webhook__event";
  line.textContent = describeWebhook(event);
  if (event.signature_verified === true) line.classList.add("webhook__verified");
  const meta = document.createElement("p");
  meta.className = "webhook__meta";
  const received = Number(event.received_at);
  const when = Number.isFinite(received) ? new Date(received * 1000).toLocaleTimeString() : "—";
  meta.textContent = `session ${event.session_id ?? "—"} · ${event.webhook_id ?? ""} · received ${when}`;
  item.append(line, meta);
  $("webhooks").prepend(item);
  $("webhooks-empty").hidden = true;
}

// The verdict step names what the backend received for this page's session, once it has.
function showBackendLine() {
  const line = $("verdict-webhook");
  const event = state.sessionId ? state.webhooks.bySession.get(state.sessionId) : undefined;
  line.textContent = event ? `Your backend received: ${describeWebhook(event)}` : "";
  line.hidden = !event;
}

function clearWebhooks() {
  state.webhooks.bySession.clear();
  $("webhooks").replaceChildren();
  $("webhooks-empty").hidden = false;
  showBackendLine();
}

function showWebhooks(data) {
  if (state.webhooks.run !== null && data.run !== state.webhooks.run) {
    // The demo restarted: its events are numbered anew. List them again from the start.
    clearWebhooks();
    state.webhooks.run = null;
    state.webhooks.after = 0;
    return;
  }
  state.webhooks.run = data.run;
  if (data.enabled === false) {
    $("webhooks-empty").textContent = "This demo runs without webhooks (it listens on no loopback address).";
  }
  const events = (Array.isArray(data.events) ? data.events : []).filter((event) => event && typeof event === "object");
  for (const event of events) {
    showWebhook(event);
    if (event.session_id) state.webhooks.bySession.set(String(event.session_id), event);
  }
  // A verdict the page did not wait for was read by the proxy's finalizer: show that read too.
  if (events.length) refreshUpstreamCalls();
  if (Number.isInteger(data.next)) state.webhooks.after = data.next;
  const refused = Number(data.refused) || 0;
  const refusedLine = $("webhooks-refused");
  refusedLine.textContent = refused
    ? `Refused ${refused} delivery attempt(s) without a valid signature: not listed.`
    : "";
  refusedLine.hidden = refused === 0;
  showBackendLine();
}

async function pollWebhooks() {
  let delay = WEBHOOK_POLL_MS;
  try {
    const response = await fetch(`/demo/api/webhooks?after=${encodeURIComponent(state.webhooks.after)}`, {
      headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store",
    });
    const text = await response.text();
    // Polled every second: an answer the same as the last adds nothing for the leak check to search.
    if (text !== state.webhooks.lastText) {
      recordReceived(response, text);
      state.webhooks.lastText = text;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = JSON.parse(text);
    if (data && typeof data === "object") showWebhooks(data);
  } catch {
    delay = WEBHOOK_RETRY_MS; // a teaching panel: it waits and tries again, the steps go on
  }
  setTimeout(pollWebhooks, delay);
}

// ---- Rendering of what can be done now -------------------------------------------------------------

function render() {
  const signedIn = state.accessToken !== null;
  const stepBusy = state.step !== null;
  const waiting = state.waitController !== null;
  const open = state.sessionId !== null && state.result === null;
  $("sign-in").disabled = stepBusy;
  $("get-token").disabled = stepBusy || !signedIn || state.sessionId !== null;
  $("create-session").disabled = stepBusy || !signedIn || !state.sessionToken || state.sessionId !== null;
  for (const id of ["capture-live", "capture-spoof", "expire-session"]) $(id).disabled = stepBusy || !signedIn || !open;
  $("cancel-wait").disabled = !waiting;
  $("progress").hidden = !waiting;
  $("start-over").disabled = !signedIn || (state.sessionToken === null && state.sessionId === null && !waiting);
  $("outage-toggle").disabled = state.outagePending;

  const done = [signedIn, state.sessionToken !== null || state.sessionId !== null, state.sessionId !== null,
    state.result !== null, state.result !== null];
  const ids = ["step-sign-in", "step-token", "step-session", "step-capture", "step-verdict"];
  const current = done.indexOf(false);
  ids.forEach((id, i) => {
    $(id).classList.toggle("step--done", done[i]);
    $(id).classList.toggle("step--current", i === current);
  });
}

// ---- Start -----------------------------------------------------------------------------------------

async function loadConfig() {
  const data = await demoApi("GET", "/demo/api/config");
  if (data && typeof data === "object") state.config = { ...state.config, ...data };
  $("demo-subject").textContent = String(state.config.subject);
  if (state.config.sandbox_url) $("sandbox-url").textContent = `a local sandbox at ${state.config.sandbox_url}`;
  $("capture-delay").textContent = `${Number(state.config.capture_delay_seconds) || 2} s`;
  if (typeof state.config.upstream_outage === "boolean") $("outage-toggle").checked = state.config.upstream_outage;
  if (typeof state.config.webhook_url === "string") $("webhook-url").textContent = state.config.webhook_url;
}

function wire() {
  $("sign-in").addEventListener("click", () => run("sign-in", signIn));
  $("get-token").addEventListener("click", () => run("get-token", getToken));
  $("create-session").addEventListener("click", () => run("create-session", createSession));
  $("capture-live").addEventListener("click", () => run("capture", () => capture("live")));
  $("capture-spoof").addEventListener("click", () => run("capture", () => capture("spoof")));
  $("expire-session").addEventListener("click", () => run("capture", () => capture("expire")));
  $("cancel-wait").addEventListener("click", () => state.waitController?.abort());
  $("start-over").addEventListener("click", startOver);
  $("outage-toggle").addEventListener("change", (event) => {
    const enabled = event.currentTarget.checked;
    run("outage", () => setOutage(enabled), { isStep: false });
  });
}

wire();
render();
run("config", loadConfig, { isStep: false });
pollWebhooks();
