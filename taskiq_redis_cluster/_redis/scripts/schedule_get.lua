-- Read the recurring schedules and the one-off schedules due in a range.
-- KEYS: schedules, cron, timeline. ARGV: min score, max score.
-- Returns a flat [id, payload, id, payload, ...]; HGET one id at a time
-- because unpacking a large id list into HMGET overflows Lua's C stack.
-- An index entry whose record is gone is dropped (cannot happen through the
-- source, whose writes are atomic, but a hand-edited source heals itself).
local out = {}
local function take(ids)
  for _, id in ipairs(ids) do
    local payload = redis.call('HGET', KEYS[1], id)
    if payload then
      out[#out + 1] = id
      out[#out + 1] = payload
    else
      redis.call('SREM', KEYS[2], id)
      redis.call('ZREM', KEYS[3], id)
    end
  end
end
take(redis.call('SMEMBERS', KEYS[2]))
take(redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[1], ARGV[2]))
return out
