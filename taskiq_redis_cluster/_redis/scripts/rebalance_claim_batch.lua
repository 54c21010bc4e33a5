-- Claim the next batch of a stream into the rebalancer's mover consumer.
-- KEYS: source stream. ARGV[1] mover consumer, ARGV[2] batch size,
-- ARGV[3] highest id to take ('+' for all).
-- Takes the next batch of entries that some group has not had delivered yet
-- (after the smallest last-delivered-id) and delivers them, in every group
-- that has not had them, to the mover consumer: from then on they sit in
-- the mover's pending list until the caller has copied and acked them.
-- Returns {batch, {group, last-delivered-id before, ...}}; {{}, {}} when
-- there is nothing (or no group: the caller copies ungrouped streams apart).

--!include stream_ids
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok or #groups == 0 then return {{}, {}} end
local names, lasts, low = {}, {}, nil
for _, g in ipairs(groups) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  names[#names + 1] = name
  lasts[#lasts + 1] = last
  if low == nil or id_less(last, low) then low = last end
end
local batch = redis.call('XRANGE', KEYS[1], '(' .. low, ARGV[3], 'COUNT', ARGV[2])
if #batch == 0 then return {{}, {}} end
local top = batch[#batch][1]
local claimed = {}
for i, name in ipairs(names) do
  if id_less(lasts[i], top) then
    local n = #redis.call('XRANGE', KEYS[1], '(' .. lasts[i], top)
    if n > 0 then
      redis.call('XREADGROUP', 'GROUP', name, ARGV[1], 'COUNT', n, 'STREAMS', KEYS[1], '>')
      claimed[#claimed + 1] = name
      claimed[#claimed + 1] = lasts[i]
    end
  end
end
return {batch, claimed}
