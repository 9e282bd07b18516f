-- wrk script for S2i: S2's create (the same ~2 KiB body as post_session.lua) with an
-- Idempotency-Key that is new on every request, so that every request is a first create (claim the
-- key, call Cynopsis, store the answer) and none a replay. The keys are `<prefix>-<n>`: the prefix
-- is the script's argument (`wrk ... <url> -- <prefix>`), new for every wrk run, as the proxy keeps
-- every key of the caller for a day and a repeated one would be answered from its record.
-- The caller's Authorization header is given with wrk's -H on the command line.
local padding = string.rep("x", 1990)
wrk.method = "POST"
wrk.body = '{"session_token":"st-bench-session-token","metadata":{"padding":"' .. padding .. '"}}'
wrk.headers["Content-Type"] = "application/json"

local prefix = "bench"
local sent = 0

function init(args)
  if args[1] then
    prefix = args[1]
  end
end

function request()
  sent = sent + 1
  wrk.headers["Idempotency-Key"] = prefix .. "-" .. sent
  return wrk.format()
end
