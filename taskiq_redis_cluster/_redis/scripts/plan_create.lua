-- Create a queue's plan record unless one exists.
-- KEYS: plan key. ARGV: format, epoch, plan json, generation.
-- Returns 1 if created, 0 if a record was already there.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'format', ARGV[1], 'epoch', ARGV[2], 'plan', ARGV[3],
           'generation', ARGV[4])
return 1
