-- wrk script: POST batches of 100 events to /webhook/batch, every event
-- with a unique event_id. Requests/s × 100 = events/s.
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
  local events = {}
  for i = 1, 100 do
    events[i] = string.format(
      '{"event_id":"%s-%d-%d-%d","event_type":"page_view","user_id":"user_%d","properties":{"page":"/pricing"}}',
      run, tid, counter, i, (counter * 100 + i) % 1000)
  end
  return wrk.format(nil, "/webhook/batch", nil, '{"events":[' .. table.concat(events, ",") .. ']}')
end

function done(summary, latency, requests)
  io.write(string.format("non-2xx/3xx: %d, socket errors: connect %d read %d write %d timeout %d\n",
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
  io.write(string.format("p50 %.2f ms, p99 %.2f ms\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
