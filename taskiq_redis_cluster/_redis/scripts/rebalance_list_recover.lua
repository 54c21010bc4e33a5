-- Hand back the processing lists of reliable list consumers that died.
-- KEYS: shard list, its reliable consumers set (same tag).
-- ARGV[1] processing-list key prefix, ARGV[2] heartbeat key prefix.
-- The processing lists of consumers whose heartbeat expired go back to the
-- consuming (right) end of the shard list, as the list broker's own recovery
-- does, so the copy that follows takes them first. Returns entries moved.
if redis.call('TYPE', KEYS[2])['ok'] ~= 'set' then return 0 end
local moved = 0
for _, c in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[2] .. c) == 0 then
    local p = ARGV[1] .. c
    while redis.call('LMOVE', p, KEYS[1], 'LEFT', 'RIGHT') do moved = moved + 1 end
    redis.call('SREM', KEYS[2], c)
  end
end
return moved
