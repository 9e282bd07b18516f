-- wrk script for S2b: the bound flow. Every create uses a session token this same caller obtained
-- from POST /v1/liveness/session-token, once: a connection whose turn comes sends a create if a
-- token is waiting, else asks for a token. The tokens wait in one queue per wrk thread (run it with
-- -t1: one Lua state then serves every connection, and a token fetched on one connection may be
-- used on another, as a caller's SDKs would). In steady state the two requests alternate; what is
-- counted is the pairs, i.e. the creates answered 201 (`counted created <n>` in `done`), since
-- wrk's own request rate and latencies mix both requests.
-- The URL given to wrk only names the proxy; the paths are set here. The create body is S2's
-- (~2 KiB, `metadata` padding) with the fetched token. Authorization comes from wrk's -H.
local token_path = "/v1/liveness/session-token"
local create_path = "/v1/liveness/sessions"
local padding = string.rep("x", 1990)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local queue, first, last = {}, 1, 0
-- Globals, so that `done` (which runs in another Lua state) can read them with thread:get.
token_requests, tokens_received, creates_sent, created = 0, 0, 0, 0

function request()
  if first <= last then
    local token = queue[first]
    queue[first] = nil
    first = first + 1
    creates_sent = creates_sent + 1
    local body = '{"session_token":"' .. token .. '","metadata":{"padding":"' .. padding .. '"}}'
    return wrk.format(nil, create_path, nil, body)
  end
  token_requests = token_requests + 1
  return wrk.format(nil, token_path, nil, "{}")
end

function response(status, headers, body)
  if status == 200 then
    local token = body:match('"session_token"%s*:%s*"([^"]+)"')
    if token then
      tokens_received = tokens_received + 1
      last = last + 1
      queue[last] = token
    end
  elseif status == 201 then
    created = created + 1
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  for _, name in ipairs({"token_requests", "tokens_received", "creates_sent", "created"}) do
    local total = 0
    for _, thread in ipairs(threads) do
      total = total + thread:get(name)
    end
    io.write(string.format("counted %s %d\n", name, total))
  end
end
