-- The dedup check of a controlled kick (stream or list), in the kick's own
-- script: the check and the write are one atomic step, so two racing kicks
-- of one key queue it once.
-- Sets marker to task_id with a ttl_ms TTL unless it is held. Returns nil
-- when the kick may go on (the marker was free, or this is a retry -
-- is_retry '1' - of the very task that holds it: that task running again,
-- not a second one), else the holder's task id.
local function dedup_holder(marker, task_id, ttl_ms, is_retry)
  if redis.call('SET', marker, task_id, 'NX', 'PX', ttl_ms) then
    return nil
  end
  local holder = redis.call('GET', marker) or ''
  if is_retry == '1' and holder == task_id then
    return nil
  end
  return holder
end
