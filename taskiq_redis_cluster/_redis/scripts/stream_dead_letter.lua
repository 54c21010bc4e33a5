-- Move one entry to the dead-letter stream and ack it, atomically.
-- KEYS: stream, dead-letter stream (same shard tag, so one slot).
-- ARGV: group, entry id, reason, deliveries, dead-letter maxlen, now (ms),
-- then the entry's fields as name/value pairs (names prefixed "field:").
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
  'reason', ARGV[3], 'original_id', ARGV[2], 'deliveries', ARGV[4],
  'stream', KEYS[1], 'dead_at_ms', ARGV[6]}
for i = 7, #ARGV do args[#args + 1] = ARGV[i] end
redis.call(unpack(args))
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
