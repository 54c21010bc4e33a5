-- Claim one firing of a schedule (exactly-once firing across schedulers).
-- KEYS: cron, timeline, claim. ARGV: id, due ("" = recurring), ttl ms, owner.
-- Returns 1 = claimed, 0 = the schedule is gone (deleted or re-timed),
-- -1 = another scheduler already claimed this firing.
if ARGV[2] == '' then
  if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
else
  local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if (not score) or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
end
if redis.call('SET', KEYS[3], ARGV[4], 'NX', 'PX', ARGV[3]) then return 1 end
return -1
