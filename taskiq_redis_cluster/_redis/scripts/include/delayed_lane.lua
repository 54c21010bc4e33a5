-- A delayed message bound for priority lane N > 0 is stored in the shard's
-- delayed set as "\0L" .. N .. "\0" .. message; lane 0's are the bare
-- message, as before lanes existed. A taskiq message never starts with a
-- NUL byte (every formatter writes a map), so the two cannot be confused.
local function delayed_member(lane, message)
  if lane > 0 then
    return '\0L' .. lane .. '\0' .. message
  end
  return message
end
-- Due time (ms) of the earliest member of delayed set key, or -1 if empty.
local function first_due(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first > 0 then
    return tonumber(first[2])
  end
  return -1
end
local function delayed_lane(member)
  if string.sub(member, 1, 2) ~= '\0L' then
    return 0, member
  end
  local stop = string.find(member, '\0', 3, true)
  if stop == nil then
    return 0, member
  end
  return tonumber(string.sub(member, 3, stop - 1)) or 0, string.sub(member, stop + 1)
end
