-- Extend the rebalance lease, only while it is still ours.
-- KEYS: lease key. ARGV: holder token, ttl in ms. Returns 1 if extended, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
