-- Record a new, empty session so that reading it gives an empty history rather than 404.
-- KEYS[1] meta hash
-- ARGV[1] session ttl in milliseconds
-- returns the creation time in ms (redis clock), or 0 if the id was already in use
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSET', KEYS[1], 'ver', 0, 'created', ms)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return ms
