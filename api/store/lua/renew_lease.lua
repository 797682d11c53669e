-- Extend a stream's lease while it runs, so that only a dead worker's leases expire. A lease that
-- expired meanwhile (its worker stalled for a whole ttl) is taken again: the stream is still running.
-- A settled lease is never taken again: a renewal built before the turn's settlement may reach Redis
-- after it (it waited for a pooled connection), and would otherwise hold one of the caller's streams
-- for a whole ttl after the stream ended.
-- KEYS[1] stream leases, KEYS[2] settled: lease id -> when, in ms (see settle.lua)
-- ARGV[1] lease id
-- ARGV[2] lease ttl in ms
-- returns 1 if renewed, 0 if the lease was settled
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
