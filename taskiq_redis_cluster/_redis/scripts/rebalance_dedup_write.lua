-- Write copies of dedup markers under another tag, never over a marker.
-- KEYS[1] any key of the target tag (it routes the call and is not touched),
-- KEYS[2..] the markers to write on the target tag (one tag, one slot).
-- ARGV: for each marker its value (the task id) and its expiry in Unix ms of
-- this master's clock ('-1': no TTL, as its source had none).
-- SET NX: a marker a producer already set on the target (it kicked the key
-- on the new plan) wins, and a rerun of the copy changes nothing. A marker
-- whose expiry has passed is not written.
-- Returns {written, this master's time in ms}. Called with KEYS[1] alone it
-- only tells the time: the caller asks it before reading the source markers'
-- TTLs, so that time plus a TTL is never later than the original's expiry.
--!include clock
local now = now_ms()
local written = 0
for i = 2, #KEYS do
  local value, at = ARGV[2 * i - 3], tonumber(ARGV[2 * i - 2])
  local ok = false
  if at < 0 then
    ok = redis.call('SET', KEYS[i], value, 'NX')
  elseif at > now then
    ok = redis.call('SET', KEYS[i], value, 'NX', 'PXAT', at)
  end
  if ok then written = written + 1 end
end
return {written, now}
