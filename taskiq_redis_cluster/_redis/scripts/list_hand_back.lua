-- Hand-back of the list broker's default mode: RPUSH to the consuming end,
-- once. The marker makes a retry after an unknown outcome (connection lost
-- after sending) harmless; without it a retried RPUSH could queue a task twice.
-- KEYS: list, marker. ARGV: marker ttl (s), then the messages, last popped first.
-- Returns the list's length, or -1 when an earlier attempt pushed them.
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
    return -1
end
return redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
