-- Move the due delayed messages of one shard into its list, oldest due first.
-- KEYS[1] shard list, KEYS[2] shard delayed set (one tag, one slot).
-- ARGV[1] most messages to move.
-- Returns {moved, next due time in Unix ms or -1, now in Unix ms}, the reply
-- of stream_promote_delayed.lua, so one promoter loop paces both.
-- LPUSH adds at the producing end like a kick, so a task that falls due
-- queues behind what is already waiting; pushed earliest due first, so
-- among themselves the earliest is popped first (BRPOP takes the far end).
-- Safe to run from many workers at once: each message is pushed and removed
-- in the same atomic step, so it reaches the list exactly once.
--!include delayed_lane
--!include clock
local now = now_ms()
local moved = 0
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #due > 0 then
  local messages = {}
  for i, member in ipairs(due) do
    -- A list has no lanes: a member written with a lane prefix (by a stream
    -- producer of the same queue name, say) is pushed as its bare message.
    local _, message = delayed_lane(member)
    messages[i] = message
  end
  redis.call('LPUSH', KEYS[1], unpack(messages))
  redis.call('ZREM', KEYS[2], unpack(due))
  moved = #due
end
return {moved, first_due(KEYS[2]), now}
