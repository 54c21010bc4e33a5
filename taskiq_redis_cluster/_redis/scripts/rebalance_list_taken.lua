-- Remove from the source list what is left of a batch already copied.
-- KEYS: source list; ARGV: the batch as LRANGE key -n -1 returned it
-- (leftmost first), already pushed to the target list. Consumers pop from
-- the right and producers push on the left, so what is left of the batch is
-- its first j elements at the very right end: remove those (largest j that
-- matches). Returns j.
local n = #ARGV
local tail = redis.call('LRANGE', KEYS[1], -n, -1)
local t = #tail
for j = math.min(n, t), 1, -1 do
  local same = true
  for k = 1, j do
    if tail[t - j + k] ~= ARGV[k] then
      same = false
      break
    end
  end
  if same then
    redis.call('LTRIM', KEYS[1], 0, -(j + 1))
    return j
  end
end
return 0
