-- Compare-and-swap of a queue's plan record.
-- KEYS: plan key. ARGV: supported format, expected epoch, new epoch, plan
-- json, "1" to check the generation (else "0"), expected generation.
-- Returns {code, detail}: 1 swapped, 2 already stored (the same plan at the
-- new epoch: a repeated call), 0 epoch mismatch (detail = stored epoch), -1
-- missing, -2 corrupt (detail = reason), -3 newer format (detail = stored
-- format), -4 other generation (detail = stored generation). A newer format
-- is never overwritten, and the generation field is never written.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return {-2, 'not a hash'} end
local vals = redis.call('HMGET', KEYS[1], 'format', 'epoch', 'generation', 'plan')
local fmt = tonumber(vals[1])
if not fmt then return {-2, 'missing or bad format field'} end
if fmt > tonumber(ARGV[1]) then return {-3, vals[1]} end
local epoch = tonumber(vals[2])
if not epoch then return {-2, 'missing or bad epoch field'} end
local generation = vals[3] or ''
if ARGV[5] == '1' and generation ~= ARGV[6] then return {-4, generation} end
if epoch == tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'format', ARGV[1], 'epoch', ARGV[3], 'plan', ARGV[4])
  return {1, ''}
end
if epoch == tonumber(ARGV[3]) and vals[4] == ARGV[4] then
  -- The swap was applied by an earlier call whose confirmation failed (or
  -- whose reply was lost). Rewriting a field with its own value is a write
  -- that replicates after that swap, so the WAIT that follows this script
  -- on the same connection confirms the swap too.
  redis.call('HSET', KEYS[1], 'epoch', vals[2])
  return {2, ''}
end
return {0, vals[2]}
