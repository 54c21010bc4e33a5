-- Trim a shard stream below what every group has received AND acknowledged.
-- KEYS: stream. Returns XTRIM's count, or -1 when the stream has no group.
-- The new MINID is the smallest of (oldest pending id, id after
-- last-delivered) over all groups. Ids are compared as strings because Lua
-- numbers are doubles.
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok or #groups == 0 then return -1 end
--!include stream_ids
local minid = nil
for _, g in ipairs(groups) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local ms, seq = id_parts(last)
  local cand = ms .. '-' .. string.format('%.0f', tonumber(seq) + 1)
  local p = redis.call('XPENDING', KEYS[1], name)
  if p[1] > 0 and id_less(p[2], cand) then cand = p[2] end
  if minid == nil or id_less(cand, minid) then minid = cand end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)
