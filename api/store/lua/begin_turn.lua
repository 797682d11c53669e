-- Take a session's turn lock and read its history in one step.
-- KEYS[1] history list (JSON messages, oldest first)
-- KEYS[2] meta hash (ver = commits so far)
-- KEYS[3] lock
-- ARGV[1] lock token (unique per turn)
-- ARGV[2] lock ttl in milliseconds
-- returns {0} when another turn holds the lock,
--         else {1, version, redis time in ms, {message, ...}}
-- Finding our own token means this is a re-send of a call that already took the lock.
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then
  return {0}
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
local now = redis.call('TIME')
local version = redis.call('HGET', KEYS[2], 'ver') or '0'
return {1, version, now[1] * 1000 + math.floor(now[2] / 1000), redis.call('LRANGE', KEYS[1], 0, -1)}
