-- Delete the rebalance lease, only while it is still ours (compare-and-delete).
-- KEYS: lease key. ARGV: holder token. Returns 1 if deleted, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
