-- Extend a lock we still hold, so a long reply keeps its session while a dead worker's lock expires.
-- KEYS[1] lock
-- ARGV[1] token
-- ARGV[2] new ttl in milliseconds
-- returns 1 if renewed, 0 if the lock is no longer ours
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
