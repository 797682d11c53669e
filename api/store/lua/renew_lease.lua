-- Extend a stream's lease while it runs, so that only a dead worker's leases expire. A lease that
-- expired meanwhile (its worker stalled for a whole ttl) is taken again: the stream is still running.
-- KEYS[1] stream leases
-- ARGV[1] lease id
-- ARGV[2] lease ttl in ms
-- returns 1
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
