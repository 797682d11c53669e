-- Append a finished turn to the history and release the lock, only if this turn still owns the
-- session: the lock token proves no other turn started, the version proves nothing was written since
-- the history was read. A re-sent commit of the same turn is recognised by its id and applied once.
-- In the same step, when a reader waits for this turn (or the turn writes its log), the log gets
-- the rest of the text and its end; and a turn sent with an idempotency key leaves its reply under that key.
-- KEYS[1] history list, KEYS[2] meta hash, KEYS[3] lock
-- KEYS[4] readers flag, KEYS[5] this turn's reply log
-- KEYS[6] (optional) the idempotency record
-- ARGV[1] lock token
-- ARGV[2] version read when the turn began
-- ARGV[3] turn id
-- ARGV[4] session ttl in milliseconds
-- ARGV[5] most messages to keep
-- ARGV[6] '1' to replace the last stored message (regenerate), else '0'
-- ARGV[7] '1' when the turn writes its reply log: ARGV[8] is then the text not yet in it,
--         with ARGV[9] its entry id; '0' when it does not (the whole reply is taken from the message)
-- ARGV[10] the reply log's ttl once ended, in milliseconds
-- ARGV[11] the idempotency record's body fingerprint, ARGV[12] its ttl in milliseconds
-- ARGV[13..] messages to append (JSON), the reply last
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
redis.call('RPUSH', KEYS[1], unpack(ARGV, 13))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[5]), -1)
redis.call('HSET', KEYS[2], 'ver', version + 1, 'turn', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[3])

local reply
local function reply_text()
  reply = reply or cjson.decode(ARGV[#ARGV])['content']
  return reply
end
if ARGV[7] == '1' or redis.call('GET', KEYS[4]) == ARGV[1] then
  redis.call('DEL', KEYS[4])
  local size
  if ARGV[7] == '1' then
    size = ARGV[9]
    if ARGV[8] ~= '' then
      redis.pcall('XADD', KEYS[5], size .. '-0', 't', ARGV[8])
    end
  else
    size = tostring(#reply_text())
    redis.call('XADD', KEYS[5], '0-1', 'start', '')
    redis.call('XADD', KEYS[5], size .. '-0', 't', reply_text())
  end
  redis.call('XADD', KEYS[5], size .. '-2', 'end', 'committed')
  redis.call('PEXPIRE', KEYS[5], ARGV[10])
end
if KEYS[6] then
  redis.call('DEL', KEYS[6])
  redis.call('HSET', KEYS[6], 'fp', ARGV[11], 'state', 'done', 'turn', ARGV[1], 'reply', reply_text())
  redis.call('PEXPIRE', KEYS[6], ARGV[12])
end
return 1
