-- Renew the leases of entries this consumer holds: reset their idle time.
-- KEYS: stream. ARGV: group, consumer, then entry ids.
-- Only ids still pending on this consumer are claimed: a plain XCLAIM would
-- also take back an entry another worker already reclaimed (and is running).
-- JUSTID keeps the delivery count, so renewing never brings an entry closer
-- to max_deliveries. Returns the ids no longer pending on this consumer.
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
local lost = {}
for i = 3, #ARGV do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if row[1] ~= nil and row[1][2] == ARGV[2] then
    claim[#claim + 1] = ARGV[i]
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if #claim > 5 then
  claim[#claim + 1] = 'JUSTID'
  redis.call(unpack(claim))
end
return lost
