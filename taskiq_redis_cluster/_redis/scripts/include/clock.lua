-- This master's clock in Unix ms: due times and marker expiries are read
-- and compared on the master that holds them, so producers' and workers'
-- clocks never matter.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
