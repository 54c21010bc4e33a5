-- Move the due delayed messages of one shard into its streams, oldest due first.
-- KEYS[1] shard stream (lane 0), KEYS[2] shard delayed set, KEYS[3..] the
-- streams of priority lanes 1, 2, ... (one tag, one slot). A message bound
-- for a lane beyond the last one given goes to the last one given.
-- ARGV[1] most messages to move, ARGV[2..] XADD trim arguments, if any.
-- Returns {moved, next due time in Unix ms or -1, now in Unix ms}; moved is
-- -1 when the stream is missing: nothing moves until a reader recreates it.
-- Safe to run from many workers at once: each message is added and removed
-- in the same atomic step, so it reaches the stream exactly once.
--!include delayed_lane
--!include clock
local now = now_ms()
local moved = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  moved = -1
else
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
  if #due > 0 then
    -- No NOMKSTREAM: lane 0 exists (checked above), and a lane stream
    -- that vanished is recreated rather than the message dropped; its
    -- reader then recreates the group at 0 (NOGROUP) and reads it.
    local xadd = {'XADD', KEYS[1]}
    for i = 2, #ARGV do
      xadd[#xadd + 1] = ARGV[i]
    end
    local n = #xadd
    xadd[n + 1] = '*'
    xadd[n + 2] = 'data'
    local last_lane = #KEYS - 2
    for _, member in ipairs(due) do
      local lane, message = delayed_lane(member)
      if lane > last_lane then lane = last_lane end
      xadd[2] = lane > 0 and KEYS[2 + lane] or KEYS[1]
      xadd[n + 3] = message
      redis.call(unpack(xadd))
    end
    redis.call('ZREM', KEYS[2], unpack(due))
    moved = #due
  end
end
return {moved, first_due(KEYS[2]), now}
