-- Append a finished turn to the history and release the lock, only if this turn still owns the
-- session: the lock token proves no other turn started, the version proves nothing was written since
-- the history was read. A re-sent commit of the same turn is recognised by its id and applied once.
-- KEYS[1] history list, KEYS[2] meta hash, KEYS[3] lock
-- ARGV[1] lock token
-- ARGV[2] version read when the turn began
-- ARGV[3] turn id
-- ARGV[4] session ttl in milliseconds
-- ARGV[5] most messages to keep
-- ARGV[6] '1' to replace the last stored message (regenerate), else '0'
-- ARGV[7..] messages to append (JSON)
-- returns 1 committed (now or by an earlier send of this commit), 0 lock lost, -1 history changed
if redis.call('HGET', KEYS[2], 'turn') == ARGV[3] then
  return 1
end
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return 0
end
local version = tonumber(redis.call('HGET', KEYS[2], 'ver') or '0')
if version ~= tonumber(ARGV[2]) then
  return -1
end
if ARGV[6] == '1' then
  redis.call('RPOP', KEYS[1])
end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 7))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[5]), -1)
redis.call('HSET', KEYS[2], 'ver', version + 1, 'turn', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[3])
return 1
