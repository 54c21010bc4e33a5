-- Hand-back of the list broker's reliable mode: each message leaves the
-- processing list and goes to the consuming end of the shard list, atomically;
-- a retry finds it already gone from the processing list and pushes nothing.
-- KEYS: list, processing. ARGV: the messages, last popped first.
-- Returns how many were moved.
local moved = 0
for i = 1, #ARGV do
    if redis.call('LREM', KEYS[2], 1, ARGV[i]) == 1 then
        redis.call('RPUSH', KEYS[1], ARGV[i])
        moved = moved + 1
    end
end
return moved
