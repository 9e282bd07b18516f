-- wrk script for S8: a flood of requests with random bad credentials to the liveness and admin
-- routes, stopped after a fixed number of answers. Arguments (`wrk ... <url> -- <answers> <shape>
-- <seed> <marker>`): how many answers this run waits for (run it with -t1: one thread, one Lua
-- state, so the count is the flood's), the shape, `one` (every request from one forwarded
-- address, 10.0.0.1) or `many` (a random 10.0.0.0/8 address per request), a seed for the random
-- credentials, and a file to create once that many have been answered. wrk itself runs for its -d
-- however early its threads stop, so the harness waits for that file and ends wrk with SIGINT,
-- on which wrk prints its summary as usual. The addresses come as X-Forwarded-For, which the proxy's server honours from
-- 127.0.0.1 (uvicorn's default --forwarded-allow-ips): the flood poses as clients behind a trusted
-- proxy, so the honest traffic (from 127.0.0.1 itself, no such header) never shares their address.
--
-- Every request carries a credential that cannot be valid: 80% `Bearer lpk_<16 hex>_<40 urlsafe>`
-- (an API key's shape, with a random key id: no negative cache of ids can have seen it), 10% a
-- random JWT-looking string, 10% none. Its route is random too: 50% GET result of a random session
-- id, 20% POST session-token, 10% POST create (a small JSON body), 20% GET the admin session list.
-- `done` prints `counted <name> <n>` lines (bench/wrk.py parses them): answers by status.
local answers_wanted = 50000
local shape = "many"
local marker = nil
local hex = "0123456789abcdef"
local urlsafe = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local session_token_path = "/v1/liveness/session-token"
local sessions_path = "/v1/liveness/sessions"

-- Globals, so that `done` (which runs in another Lua state) can read them with thread:get.
sent, answered, unauthorized, too_many, other = 0, 0, 0, 0, 0

local function random_text(alphabet, length)
  local chars = {}
  local size = #alphabet
  for i = 1, length do
    local at = math.random(size)
    chars[i] = alphabet:sub(at, at)
  end
  return table.concat(chars)
end

function init(args)
  if args[1] then
    answers_wanted = tonumber(args[1])
  end
  if args[2] then
    shape = args[2]
  end
  math.randomseed(tonumber(args[3] or "1"))
  marker = args[4]
end

local function credential_headers()
  local headers = {}
  local pick = math.random(10)
  if pick <= 8 then
    headers["Authorization"] = "Bearer lpk_" .. random_text(hex, 16) .. "_" .. random_text(urlsafe, 40)
  elseif pick == 9 then
    headers["Authorization"] = "Bearer eyJ" .. random_text(urlsafe, 30) .. "." .. random_text(urlsafe, 60)
      .. "." .. random_text(urlsafe, 43)
  end
  if shape == "one" then
    headers["X-Forwarded-For"] = "10.0.0.1"
  else
    headers["X-Forwarded-For"] = string.format(
      "10.%d.%d.%d", math.random(0, 255), math.random(0, 255), math.random(0, 255)
    )
  end
  return headers
end

function request()
  sent = sent + 1
  local headers = credential_headers()
  local pick = math.random(10)
  if pick <= 5 then
    return wrk.format("GET", sessions_path .. "/" .. random_text(urlsafe, 24) .. "/result", headers)
  elseif pick <= 7 then
    headers["Content-Type"] = "application/json"
    return wrk.format("POST", session_token_path, headers, "{}")
  elseif pick == 8 then
    headers["Content-Type"] = "application/json"
    return wrk.format("POST", sessions_path, headers, '{"session_token":"st-flood"}')
  end
  return wrk.format("GET", sessions_path, headers)
end

function response(status, headers, body)
  answered = answered + 1
  if status == 401 then
    unauthorized = unauthorized + 1
  elseif status == 429 then
    too_many = too_many + 1
  else
    other = other + 1
  end
  if answered == answers_wanted then
    if marker then
      local file = io.open(marker, "w")
      file:write("done\n")
      file:close()
    end
    wrk.thread:stop()
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  for _, name in ipairs({"sent", "answered", "unauthorized", "too_many", "other"}) do
    local total = 0
    for _, thread in ipairs(threads) do
      total = total + thread:get(name)
    end
    io.write(string.format("counted %s %d\n", name, total))
  end
end
