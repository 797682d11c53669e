-- Give back an idempotency key whose turn failed or was cancelled, so that a retry runs anew; only
-- while the key still names that turn and its reply was not committed.
-- KEYS[1] idempotency record
-- ARGV[1] the turn's lock token
-- returns 1 if released, else 0
local record = redis.call('HMGET', KEYS[1], 'state', 'turn')
if record[1] == 'live' and record[2] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
