-- A kick with task controls (a delay, a dedup key, or both), atomic on one shard.
-- KEYS[1] the stream of the kick's priority lane, KEYS[2] shard delayed set,
-- KEYS[3] dedup marker (only with a dedup key); all share the shard's hash tag.
-- ARGV[1] message, ARGV[2] delay in ms (0: none), ARGV[3] dedup TTL in ms,
-- ARGV[4] task id (the marker's value), ARGV[5] '1' when the kick is a retry
-- (taskiq's retry middlewares re-kick a failed task with its own task id and
-- a _retries label), ARGV[6] priority lane (0: the shard's stream), ARGV[7..]
-- XADD trim arguments, if any.
-- Returns nil when the stream is missing, writing nothing (a retired shard or
-- a lost key: the caller re-reads the plan, as for XADD NOMKSTREAM); else
-- {'queued', entry id}, {'delayed', due time in Unix ms} or
-- {'duplicate', task id of the kick that set the marker}. A retry of the very
-- task that holds the marker is queued: it is that task running again, not
-- a second one.
-- The due time is this master's clock, the one the promoter compares with,
-- so producers' clocks do not matter.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
--!include kick_controls
if #KEYS >= 3 then
  local holder = dedup_holder(KEYS[3], ARGV[4], ARGV[3], ARGV[5])
  if holder ~= nil then
    return {'duplicate', holder}
  end
end
--!include delayed_lane
--!include clock
local delay = tonumber(ARGV[2])
if delay > 0 then
  local due = now_ms() + delay
  redis.call('ZADD', KEYS[2], due, delayed_member(tonumber(ARGV[6]), ARGV[1]))
  return {'delayed', due}
end
local xadd = {'XADD', KEYS[1], 'NOMKSTREAM'}
for i = 7, #ARGV do
  xadd[#xadd + 1] = ARGV[i]
end
xadd[#xadd + 1] = '*'
xadd[#xadd + 1] = 'data'
xadd[#xadd + 1] = ARGV[1]
return {'queued', redis.call(unpack(xadd))}
