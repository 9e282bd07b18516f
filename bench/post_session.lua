-- wrk script for S2: every request is a create-session POST with a ~2 KiB JSON body.
-- The caller's Authorization header (our proxy only) is given with wrk's -H on the command line.
local padding = string.rep("x", 1990)
wrk.method = "POST"
wrk.body = '{"session_token":"st-bench-session-token","metadata":{"padding":"' .. padding .. '"}}'
wrk.headers["Content-Type"] = "application/json"
