-- End an admitted request: give back its stream lease, charge the tokens its turn used and count its
-- usage. A settle is recognised by its lease id in a set of recent settlements, so a re-sent settle
-- (redis-py or the commit re-sends after a timeout) charges and counts nothing more; and a turn whose
-- lease lapsed meanwhile (its worker was cut off from Redis for a whole ttl) is still charged for what
-- it used.
-- KEYS[1] limits hash (see admit.lua), KEYS[2] stream leases, KEYS[3] settled: lease id -> when, in ms
-- KEYS[4..6] (optional) usage hashes of the worker's yesterday, today and tomorrow (see usage.py)
-- ARGV[1] lease id
-- ARGV[2] tokens the turn used, as the token limit counts them
-- ARGV[3] tokens per window (0: no limit)
-- ARGV[4] window in ms
-- with KEYS[4..6]:
-- ARGV[5] the day KEYS[5] is for, in days since 1970-01-01 (UTC)
-- ARGV[6] days a day's usage is kept after it ends
-- ARGV[7] model ('': the turn never reached Claude, and counts as nothing)
-- ARGV[8..11] input_tokens, output_tokens, cache_read_input_tokens, cache_creation_input_tokens
-- returns 1 if settled now, 0 if it was settled before
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local tokens, limit, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tokens > 0 and limit > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tok', 'tok_at')
  local level = 0
  if state[1] then
    level = math.max(0, tonumber(state[1]) - math.max(0, now - tonumber(state[2])) * limit)
  end
  level = level + tokens * window
  redis.call('HSET', KEYS[1], 'tok', string.format('%.0f', level), 'tok_at', now)
  local ttl = redis.call('PTTL', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], math.max(ttl, math.ceil(level / limit) + 1000))
end
if #KEYS == 6 and ARGV[7] ~= '' then
  local day = math.floor(now / 86400000)
  -- Redis's day, not the worker's: a worker whose clock is off by under a day names it too.
  local key = KEYS[5 + math.max(-1, math.min(1, day - tonumber(ARGV[5])))]
  local model = ARGV[7]
  redis.call('HINCRBY', key, 'turns:' .. model, 1)
  local counts = {'input_tokens', 'output_tokens', 'cache_read_input_tokens', 'cache_creation_input_tokens'}
  for i, name in ipairs(counts) do
    local n = tonumber(ARGV[7 + i])
    if n > 0 then
      redis.call('HINCRBY', key, name .. ':' .. model, n)
    end
  end
  redis.call('PEXPIREAT', key, (day + 1 + tonumber(ARGV[6])) * 86400000)
end
-- A re-send, or a renewal built before this settle (renew_lease.lua checks this set), comes within
-- seconds; a window's worth of memory is plenty.
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
redis.call('PEXPIRE', KEYS[3], window)
return 1
