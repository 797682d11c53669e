-- Release a lock only if it is still ours: it may have expired and been taken by another turn.
-- KEYS[1] lock
-- ARGV[1] token
-- returns 1 if released, 0 if it was not ours
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
