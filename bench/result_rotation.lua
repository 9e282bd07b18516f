-- wrk script for S0, S1, S1-final and S3: every request is a GET of the next session's result, in
-- rotation over a pool of sessions, so that our proxy cannot share or reuse one read's answer for
-- another (single flight per session id and the reuse window of a pending result only ever join
-- reads of the same session that are close in time).
-- Arguments (after wrk's `--`): the path before the session's number, the path after it, the pool's
-- size, wrk's thread count and (optional) the session to start at. Path n is <before><n><after>, e.g. /v1/liveness/sessions/pending-7/result
-- (ours, the naive proxy), /liveness_result/pending-7 (nginx), /service/liveness-v2/liveness_result/pending-7
-- (the stub direct): every system reads the same sessions in the same order.
-- Thread k of T reads sessions k, k+T, k+2T, ... (each thread is a Lua state of its own): no two
-- threads read one session close together. The URL given to wrk only names the server;
-- Authorization comes from wrk's -H.
local requests, position = {}, 0
local threads_seen = 0

function setup(thread)
  thread:set("thread_index", threads_seen)
  threads_seen = threads_seen + 1
end

function init(args)
  local before, after, count, threads = args[1], args[2], tonumber(args[3]), tonumber(args[4] or "1")
  -- Formatted once: a request costs wrk a table lookup, not a string build.
  for n = thread_index or 0, count - 1, threads do
    requests[#requests + 1] = wrk.format("GET", before .. n .. after)
  end
  -- request() advances before it sends: the first request is requests[position + 1].
  position = math.floor(tonumber(args[5] or "0") / threads) % #requests
end

function request()
  position = position % #requests + 1
  return requests[position]
end
