-- One listening worker's heartbeat (or its leave) in its queue's worker set.
-- KEYS: the worker set (sorted set: member -> expiry, ms of this master's clock).
-- ARGV: member, ttl ms, 'beat' or 'leave'.
-- Members past their expiry are dropped first, so a worker killed without
-- leaving is gone ttl ms after its last beat. The master's clock alone
-- scores the set: workers' clocks may disagree. The set expires when its
-- last beat is old, so a queue nobody listens to leaves nothing behind.
-- Returns the live members.
local key = KEYS[1]
local ttl = tonumber(ARGV[2])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', ms)
if ARGV[3] == 'leave' then
  redis.call('ZREM', key, ARGV[1])
else
  redis.call('ZADD', key, ms + ttl, ARGV[1])
  if redis.call('PTTL', key) < 2 * ttl then
    redis.call('PEXPIRE', key, 2 * ttl)
  end
end
return redis.call('ZRANGE', key, 0, -1)
