// Runs the proxy's JS client in Node against a real proxy, for test_js_client_retries.py: one call of
// the client per run, described by the JSON object in argv[2]; what happened is printed as one JSON
// line. The client is the module the proxy serves (fetched from it and imported as is), with Node's
// own fetch: the only stand-ins are the network faults of the relay below.
//
// Config: {proxyUrl, apiKey, call: "createSession" | "getSessionToken", body, options, relayFaults,
//          abortAfterMs, abortDuringInFlightWait, settleMs}
import net from "node:net";
import { setTimeout as sleep } from "node:timers/promises";

const config = JSON.parse(process.argv[2]);

const source = await (await fetch(`${config.proxyUrl}/client/liveness-proxy-client.js`)).text();
const { LivenessProxyClient, LivenessProxyError, NetworkError } = await import(
  `data:text/javascript;base64,${Buffer.from(source).toString("base64")}`
);

// A TCP relay in front of the proxy that fails connections as a mobile network does, one fault per
// new connection in order, then relays faithfully: "refuse" resets the connection before anything
// reaches the proxy; "drop-answer" lets the request through and resets the connection when the answer
// starts, so the proxy did the work and the client never learns its outcome.
function startRelay(target, faults) {
  const { hostname, port } = new URL(target);
  const server = net.createServer((incoming) => {
    const fault = faults.shift() ?? "relay";
    if (fault === "refuse") {
      incoming.resetAndDestroy();
      return;
    }
    const outgoing = net.connect(Number(port), hostname);
    incoming.on("error", () => outgoing.destroy());
    outgoing.on("error", () => incoming.destroy());
    incoming.on("close", () => outgoing.destroy());
    outgoing.on("close", () => incoming.destroy());
    incoming.pipe(outgoing);
    if (fault === "drop-answer") {
      outgoing.once("data", () => incoming.resetAndDestroy());
    } else {
      outgoing.pipe(incoming);
    }
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

const relay = config.relayFaults ? await startRelay(config.proxyUrl, [...config.relayFaults]) : null;
const baseUrl = relay ? `http://127.0.0.1:${relay.address().port}` : config.proxyUrl;

const started = performance.now();
const elapsed = () => Math.round(performance.now() - started);
// What went on the wire, as the client handed it to fetch.
const sent = [];
const recordingFetch = (url, init) => {
  sent.push({ url: String(url), method: init.method, idempotencyKey: init.headers["Idempotency-Key"] ?? null,
    body: init.body ?? null, atMs: elapsed() });
  return fetch(url, init);
};
const calls = [];
const retries = [];

const controller = new AbortController();
const abortReason = new DOMException("Stopped by the test.", "AbortError");
const abort = () => controller.abort(abortReason);
if (config.abortAfterMs != null) setTimeout(abort, config.abortAfterMs);

function describe(error) {
  return {
    name: error?.name ?? null,
    message: String(error?.message ?? error),
    isAbortReason: error === abortReason,
    isNetworkError: error instanceof NetworkError,
    isProxyError: error instanceof LivenessProxyError,
    status: error?.status ?? null,
    slug: error?.slug ?? null,
    replayed: error?.replayed ?? null,
    retryAfterSeconds: error?.retryAfterSeconds ?? null,
    timeoutMs: error?.timeoutMs ?? null,
  };
}

const client = new LivenessProxyClient({
  baseUrl,
  credential: config.apiKey,
  fetch: recordingFetch,
  onCall: (call) => calls.push({ ...call, atMs: elapsed() }),
});

let outcome;
try {
  const data = config.call === "getSessionToken"
    ? await client.getSessionToken(undefined, { signal: controller.signal })
    : await client.createSession(config.body, {
      ...config.options,
      signal: controller.signal,
      onRetry: ({ attempt, error, delayMs, idempotencyKey }) => {
        retries.push({ attempt, error: describe(error), delayMs, idempotencyKey, atMs: elapsed() });
        if (config.abortDuringInFlightWait && error.slug === "idempotency-key-in-flight") setTimeout(abort, 100);
      },
    });
  outcome = { ok: true, data };
} catch (error) {
  outcome = { ok: false, error: describe(error) };
}
const outcomeAtMs = elapsed();
const sentAtOutcome = sent.length;
// Long enough for any retry the client had scheduled: nothing more may go out after the outcome.
if (config.settleMs) await sleep(config.settleMs);

relay?.close();
process.stdout.write(`${JSON.stringify({ outcome, outcomeAtMs, sentAtOutcome, sent, calls, retries })}\n`, () => {
  process.exit(0); // idle keep-alive connections must not hold the test up
});
