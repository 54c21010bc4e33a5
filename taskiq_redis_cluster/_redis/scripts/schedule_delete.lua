-- Delete a schedule and its index entries.
-- KEYS: schedules, cron, timeline. ARGV: id. Returns 1 if it existed.
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return n
