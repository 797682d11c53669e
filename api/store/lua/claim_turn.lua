-- Begin a turn sent with an idempotency key: what begin_turn.lua does, once the key says the turn is
-- new. The key is claimed in the same step as the lock, so a duplicate finds either the turn in
-- flight (which holds the lock under the token the key names) or its committed reply.
-- KEYS[1] history list, KEYS[2] meta hash, KEYS[3] lock, KEYS[4] idempotency record (a hash)
-- ARGV[1] lock token (unique per turn)
-- ARGV[2] lock ttl in milliseconds
-- ARGV[3] the request body's fingerprint
-- ARGV[4] the record's ttl in milliseconds
-- returns {0} when another turn holds the lock,
--         {1, version, redis time in ms, {message, ...}} when this turn begins,
--         {2} when the key was used with another body,
--         {3, reply} when the key's turn was committed,
--         {4, token} when the key's turn is in flight under that token
local record = redis.call('HMGET', KEYS[4], 'fp', 'state', 'turn', 'reply')
local holder = redis.call('GET', KEYS[3])
if record[1] then
  if record[1] ~= ARGV[3] then
    return {2}
  end
  if record[2] == 'done' then
    return {3, record[4]}
  end
  if record[3] ~= ARGV[1] and holder == record[3] then
    return {4, holder}
  end
  -- Its turn ended without a commit and without giving the key back (its worker died): claim it anew.
end
if holder and holder ~= ARGV[1] then
  return {0}
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], 'fp', ARGV[3], 'state', 'live', 'turn', ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
local now = redis.call('TIME')
local version = redis.call('HGET', KEYS[2], 'ver') or '0'
return {1, version, now[1] * 1000 + math.floor(now[2] / 1000), redis.call('LRANGE', KEYS[1], 0, -1)}
