-- Admit one chat request if every limit of its caller allows it, and only then take from each.
-- Requests and tokens are GCRA buckets kept as a level that drains continuously: a bucket of L per
-- window drains L units per ms and one request (or token) adds `window` units, so a full bucket
-- (L * window units) holds exactly L of them and empties in one window. Streams are leases in a sorted
-- set scored by expiry, so a dead worker's lease frees itself.
-- KEYS[1] limits hash: req, req_at (request bucket level, and when it was measured, in ms), tok, tok_at
-- KEYS[2] stream leases: sorted set of lease id -> expiry in ms
-- ARGV[1] '1' to take, '0' to only look (nothing is written)
-- ARGV[2] lease id of this request
-- ARGV[3] requests per window (0: no limit)
-- ARGV[4] tokens per window (0: no limit)
-- ARGV[5] streams at once (0: no limit)
-- ARGV[6] lease ttl in ms
-- ARGV[7] window in ms
-- returns {1 admitted (or already admitted by an earlier send of this call) | 0 refused,
--          refused by: '' | 'requests' | 'tokens' | 'streams', ms to wait before retrying,
--          requests remaining (-1: no request limit), ms until the request bucket frees one}
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local take, lease = ARGV[1] == '1', ARGV[2]
local req_limit, tok_limit, streams = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl, window = tonumber(ARGV[6]), tonumber(ARGV[7])
local state = redis.call('HMGET', KEYS[1], 'req', 'req_at', 'tok', 'tok_at')

local function level(value, at, limit)
  if not value then
    return 0
  end
  return math.max(0, tonumber(value) - math.max(0, now - tonumber(at)) * limit)
end

local function quota(req)
  if req_limit == 0 then
    return -1, 0
  end
  local remaining = math.floor((req_limit * window - req) / window)
  if req <= 0 then
    return remaining, 0
  end
  return remaining, math.ceil(((req - 1) % window + 1) / req_limit)
end

local req = req_limit > 0 and level(state[1], state[2], req_limit) or 0
local tok = tok_limit > 0 and level(state[3], state[4], tok_limit) or 0
if take and redis.call('ZSCORE', KEYS[2], lease) then
  local remaining, reset = quota(req)
  return {1, '', 0, remaining, reset}
end

local refused, wait = '', 0
local function refuse(limit, ms)
  if ms > wait then
    refused, wait = limit, ms
  end
end
if req_limit > 0 and req + window > req_limit * window then
  refuse('requests', math.ceil((req + window - req_limit * window) / req_limit))
end
if tok_limit > 0 and tok + window > tok_limit * window then
  refuse('tokens', math.ceil((tok + window - tok_limit * window) / tok_limit))
end
if streams > 0 and redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf') >= streams then
  -- A stream's end cannot be foreseen; a second is a fair time to come back.
  refuse('streams', 1000)
end
if refused ~= '' or not take then
  local remaining, reset = quota(req)
  return {refused == '' and 1 or 0, refused, wait, remaining, reset}
end

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + ttl, lease)
redis.call('PEXPIRE', KEYS[2], ttl)
if req_limit > 0 then
  req = req + window
  redis.call('HSET', KEYS[1], 'req', string.format('%.0f', req), 'req_at', now)
  -- The token bucket may hold more than a window's worth (a turn's usage is charged after it ran).
  local drains = tok_limit > 0 and math.ceil(tok / tok_limit) or 0
  redis.call('PEXPIRE', KEYS[1], math.max(window, drains) + 1000)
end
local remaining, reset = quota(req)
return {1, '', 0, remaining, reset}
