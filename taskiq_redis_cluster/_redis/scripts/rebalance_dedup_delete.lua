-- Delete dedup markers of a removed shard once they were copied.
-- KEYS: markers (one tag, one slot); ARGV: for each key the value the copy
-- read. A marker is deleted only while it still holds that value: one that
-- expired and was set again since (only possible if something recreated the
-- removed stream) is left for the sweep. Returns the number deleted.
local deleted = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    deleted = deleted + redis.call('DEL', key)
  end
end
return deleted
