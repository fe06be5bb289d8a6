-- The seeds' accept step in one round trip: claim the idempotency key for a
-- day, and append the event to the stream only if the key was new. One
-- EVAL/EVALSHA, so the two writes are atomic and share one AOF fsync.
--
--   KEYS[1]  idempotency key (idem:<event_id>)
--   KEYS[2]  stream
--   ARGV[1]  the event as JSON
--   ARGV[2]  receipt time, ms since the epoch
--
-- Returns 1 (accepted, appended) or 0 (duplicate, nothing written).
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then
  redis.call('XADD', KEYS[2], '*', 'event', ARGV[1], 'received_at_ms', ARGV[2])
  return 1
end
return 0
