-- What is left to consume in one shard, and optionally delete it when drained.
-- KEYS: shard stream, shard list, reliable list consumers set, and optionally
-- the shard's delayed set (one tag, one slot).
-- ARGV[1] '1': delete the three keys, atomically, when nothing is left to
-- consume; ARGV[2] processing-list key prefix of the list consumers.
-- Returns {exists, length, groups, undelivered, pending, list_length,
-- deleted, held}; undelivered is the largest group lag (1 when a lag is
-- unknown but an entry after last-delivered-id exists; the stream length when
-- there is no group); held counts entries in consumers' processing lists.
-- A 9th value, delayed, counts tasks waiting in the delayed set: a shard that
-- holds any is not drained, so its stream is never deleted under them.
local exists, length, ngroups, undelivered, pending, llen = 0, 0, 0, 0, 0, 0
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'stream' then
  exists = 1
  length = redis.call('XLEN', KEYS[1])
  local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
  ngroups = #groups
  if ngroups == 0 then undelivered = length end
  for _, g in ipairs(groups) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    pending = pending + tonumber(f['pending'])
    local lag = f['lag']
    if type(lag) == 'number' then
      if lag > undelivered then undelivered = lag end
    else
      local after = redis.call('XRANGE', KEYS[1], '(' .. f['last-delivered-id'], '+', 'COUNT', 1)
      if #after > 0 and undelivered < 1 then undelivered = 1 end
    end
  end
elseif t ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' is a ' .. t .. ', not a stream')
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
if KEYS[4] then
  local zt = redis.call('TYPE', KEYS[4])['ok']
  if zt == 'zset' then
    delayed = redis.call('ZCARD', KEYS[4])
  elseif zt ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[4] .. ' is a ' .. zt .. ', not a zset')
  end
end
local deleted = 0
if ARGV[1] == '1' and undelivered == 0 and pending == 0 and llen == 0 and held == 0
    and delayed == 0 then
  deleted = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
return {exists, length, ngroups, undelivered, pending, llen, deleted, held, delayed}
