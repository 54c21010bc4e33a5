-- Move a consumer's processing list back to the consuming end of the shard
-- list and forget the consumer. The processing list holds the newest pop on
-- the left (BLMOVE ... LEFT), so moving from the left to the list's right end
-- leaves the oldest pop at the right end: popped first again, as before.
-- With ARGV[2] == '1' (recovery) nothing happens while the heartbeat lives.
-- KEYS: list, processing, heartbeat, consumers. ARGV: consumer, check.
-- Returns how many were moved, or -1 when the heartbeat lives.
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
    return -1
end
local moved = 0
while redis.call('LMOVE', KEYS[2], KEYS[1], 'LEFT', 'RIGHT') do
    moved = moved + 1
end
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
return moved
