-- Move the due delayed messages of one shard into its stream, oldest due first.
-- KEYS[1] shard stream, KEYS[2] shard delayed set (one tag, one slot).
-- ARGV[1] most messages to move, ARGV[2..] XADD trim arguments, if any.
-- Returns {moved, next due time in Unix ms or -1, now in Unix ms}; moved is
-- -1 when the stream is missing: nothing moves until a reader recreates it.
-- Safe to run from many workers at once: each message is added and removed
-- in the same atomic step, so it reaches the stream exactly once.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local moved = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  moved = -1
else
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
  if #due > 0 then
    local xadd = {'XADD', KEYS[1], 'NOMKSTREAM'}
    for i = 2, #ARGV do
      xadd[#xadd + 1] = ARGV[i]
    end
    local n = #xadd
    xadd[n + 1] = '*'
    xadd[n + 2] = 'data'
    for _, message in ipairs(due) do
      xadd[n + 3] = message
      redis.call(unpack(xadd))
    end
    redis.call('ZREM', KEYS[2], unpack(due))
    moved = #due
  end
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local next_due = -1
if #first > 0 then
  next_due = tonumber(first[2])
end
return {moved, next_due, now}
