-- Read dedup markers of one shard, to copy them to the shard's new tag.
-- KEYS: markers P:{tag}:dedup:<key> (one tag, one slot).
-- Returns {value, pttl, value, pttl, ...} in KEYS order: value false and pttl
-- -2 for a marker that is gone (or is not a string), pttl -1 for one without
-- a TTL. Value and TTL come from one script, so a pair always belongs to one
-- marker: it cannot expire, or be set again by another task, between them.
local out = {}
for i, key in ipairs(KEYS) do
  local value, pttl = false, -2
  if redis.call('TYPE', key)['ok'] == 'string' then
    value = redis.call('GET', key)
    pttl = redis.call('PTTL', key)
  end
  out[2 * i - 1] = value
  out[2 * i] = pttl
end
return out
