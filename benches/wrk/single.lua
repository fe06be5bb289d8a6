-- wrk script: POST one event per request to /webhook/events, each with a
-- unique event_id (thread number + counter + a per-run prefix), so every
-- request is a real accept (no duplicates).
local threads = {}
local run = tostring(os.time())

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"event_id":"%s-%d-%d","event_type":"page_view","user_id":"user_%d","properties":{"page":"/pricing"}}',
    run, tid, counter, counter % 1000)
  return wrk.format(nil, "/webhook/events", nil, body)
end

function done(summary, latency, requests)
  local codes = summary.errors.status
  io.write(string.format("non-2xx/3xx: %d, socket errors: connect %d read %d write %d timeout %d\n",
    codes, summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
  io.write(string.format("p50 %.2f ms, p99 %.2f ms\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
