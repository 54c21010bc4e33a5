-- Delete copied entries of a stream that no consumer group reads.
-- KEYS: source stream; ARGV: entry ids already copied. Deletes them only
-- while the stream has no consumer group: once a group exists, a deleted
-- entry could be one a consumer holds pending (returns -1; the caller then
-- claims through the group, which at worst copies these again).
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok and #groups > 0 then return -1 end
return redis.call('XDEL', KEYS[1], unpack(ARGV))
