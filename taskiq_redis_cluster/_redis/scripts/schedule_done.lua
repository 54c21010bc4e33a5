-- Mark a one-off firing done: delete the schedule, unless it was re-added
-- with another time in the meantime, together with its claim (a schedule
-- re-added later under the same id and time is a new firing and must not
-- find the old claim).
-- KEYS: schedules, timeline, claim. ARGV: id, due. Returns 1 if deleted.
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
  return 1
end
return 0
