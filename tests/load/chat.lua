-- wrk script: a small non-stream chat completion, as an SDK would send it.
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello there"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-token"
-- the benchmark's session modes name one session on every request
local session = os.getenv("KP_SESSION")
if session and session ~= "" then wrk.headers["x-session-id"] = session end
