-- What is left to consume in one shard, and optionally delete it when drained.
-- KEYS: shard stream (priority lane 0), shard list, reliable list consumers
-- set, the shard's delayed set, then the streams of priority lanes 1, 2, ...
-- (one tag, one slot; a lane that does not exist counts as empty).
-- ARGV[1] '1': delete the stream, every lane stream, the list and the
-- consumers set, atomically, when nothing is left to consume; ARGV[2]
-- processing-list key prefix of the list consumers.
-- Returns {exists, length, groups, undelivered, pending, list_length,
-- deleted, held, delayed, lanes}, summed over the shard's streams (lane 0
-- and the lanes): exists is 1 when any of them exists, groups the most
-- groups of one stream, undelivered per stream the largest group lag (1
-- when a lag is unknown but an entry after last-delivered-id exists; the
-- stream length when there is no group); held counts entries in consumers'
-- processing lists; delayed counts tasks waiting in the delayed set (a
-- shard that holds any is not drained, so its streams are never deleted
-- under them); lanes lists the numbers of the lane streams (> 0) that exist.
local exists, length, ngroups, undelivered, pending, llen = 0, 0, 0, 0, 0, 0
local lanes = {}
local function stream_state(key)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' then return false end
  if t ~= 'stream' then
    return redis.error_reply('WRONGTYPE ' .. key .. ' is a ' .. t .. ', not a stream')
  end
  exists = 1
  local n = redis.call('XLEN', key)
  length = length + n
  local groups = redis.call('XINFO', 'GROUPS', key)
  if #groups > ngroups then ngroups = #groups end
  local most = 0
  if #groups == 0 then most = n end
  for _, g in ipairs(groups) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    pending = pending + tonumber(f['pending'])
    local lag = f['lag']
    if type(lag) == 'number' then
      if lag > most then most = lag end
    else
      local after = redis.call('XRANGE', key, '(' .. f['last-delivered-id'], '+', 'COUNT', 1)
      if #after > 0 and most < 1 then most = 1 end
    end
  end
  undelivered = undelivered + most
  return true
end
local found = stream_state(KEYS[1])
if type(found) == 'table' then return found end
for i = 5, #KEYS do
  found = stream_state(KEYS[i])
  if type(found) == 'table' then return found end
  if found then lanes[#lanes + 1] = i - 4 end
end
local lt = redis.call('TYPE', KEYS[2])['ok']
if lt == 'list' then
  llen = redis.call('LLEN', KEYS[2])
elseif lt ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' is a ' .. lt .. ', not a list')
end
local held = 0
if redis.call('TYPE', KEYS[3])['ok'] == 'set' then
  for _, c in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local p = ARGV[2] .. c
    if redis.call('TYPE', p)['ok'] == 'list' then held = held + redis.call('LLEN', p) end
  end
end
local delayed = 0
local zt = redis.call('TYPE', KEYS[4])['ok']
if zt == 'zset' then
  delayed = redis.call('ZCARD', KEYS[4])
elseif zt ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[4] .. ' is a ' .. zt .. ', not a zset')
end
local deleted = 0
if ARGV[1] == '1' and undelivered == 0 and pending == 0 and llen == 0 and held == 0
    and delayed == 0 then
  deleted = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  for _, lane in ipairs(lanes) do
    deleted = deleted + redis.call('DEL', KEYS[4 + lane])
  end
end
return {exists, length, ngroups, undelivered, pending, llen, deleted, held, delayed, lanes}
