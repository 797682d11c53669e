-- Take a session's turn lock and read its history in one step.
-- KEYS[1] history list (JSON messages, oldest first)
-- KEYS[2] meta hash (ver = commits so far)
-- KEYS[3] lock
-- ARGV[1] lock token (unique per turn)
-- ARGV[2] lock ttl in milliseconds
-- returns {0} when another turn holds the lock,
--         else {1, version, redis time in ms, {message, ...}}
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0}
end
local now = redis.call('TIME')
local version = redis.call('HGET', KEYS[2], 'ver') or '0'
return {1, version, now[1] * 1000 + math.floor(now[2] / 1000), redis.call('LRANGE', KEYS[1], 0, -1)}
