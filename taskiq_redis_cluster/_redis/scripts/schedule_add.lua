-- Store a schedule and index it.
-- KEYS: schedules, cron, timeline. ARGV: id, payload, score ("" = recurring).
-- Re-adding an id moves it between indexes, so a schedule is never in both.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '' then
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
else
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[1])
end
return 1
