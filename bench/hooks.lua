-- wrk script for bench/hooks.py: POST one body, each request with the next pre-signed bearer JWT
-- (a JWT's jti is accepted once); print a JSON summary at the end.
-- Environment: BENCH_PATH, BENCH_BODY (file), BENCH_TOKENS (file, one JWT a line).
local tokens, issued, body, path = {}, 0, nil, nil

function init(args)
  for line in io.lines(os.getenv("BENCH_TOKENS")) do tokens[#tokens + 1] = line end
  local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
  body = f:read("*a")
  f:close()
  path = os.getenv("BENCH_PATH")
end

function request()
  issued = issued + 1
  -- past the last token the same one is resent: the server refuses it (401), the run counts an error
  local token = tokens[math.min(issued, #tokens)]
  return wrk.format("POST", path, {["Authorization"] = "Bearer " .. token,
                                   ["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": %d, "non_2xx": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
