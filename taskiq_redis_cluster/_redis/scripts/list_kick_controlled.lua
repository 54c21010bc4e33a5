-- A list kick with task controls (a delay, a dedup key, or both), atomic on one shard.
-- KEYS[1] shard list, KEYS[2] shard delayed set, KEYS[3] dedup marker (only
-- with a dedup key); all share the shard's hash tag.
-- ARGV[1] message, ARGV[2] delay in ms (0: none), ARGV[3] dedup TTL in ms,
-- ARGV[4] task id (the marker's value), ARGV[5] '1' when the kick is a retry
-- (taskiq's retry middlewares re-kick a failed task with its own task id and
-- a _retries label).
-- Returns {'queued', list length}, {'delayed', due time in Unix ms} or
-- {'duplicate', task id of the kick that set the marker}. A retry of the very
-- task that holds the marker is queued: it is that task running again, not
-- a second one.
-- Unlike the stream script there is no missing-key check: a list exists only
-- while it holds messages, so a push cannot be fenced (see list_* docs).
-- The due time is this master's clock, the one the promoter compares with,
-- so producers' clocks do not matter. A list has no priority lanes, so the
-- member is the bare message.
--!include kick_controls
if #KEYS >= 3 then
  local holder = dedup_holder(KEYS[3], ARGV[4], ARGV[3], ARGV[5])
  if holder ~= nil then
    return {'duplicate', holder}
  end
end
--!include clock
local delay = tonumber(ARGV[2])
if delay > 0 then
  local due = now_ms() + delay
  redis.call('ZADD', KEYS[2], due, ARGV[1])
  return {'delayed', due}
end
return {'queued', redis.call('LPUSH', KEYS[1], ARGV[1])}
