-- Read one page of a session's history, newest page first: the `limit` messages just before the
-- message `before` (or the newest `limit`), oldest first within the page. Only the page is sent
-- back; finding `before` reads the list in windows from its newest end and stops at the match.
-- KEYS[1] history list (JSON messages, oldest first, each opening with {"id":"<id>",)
-- KEYS[2] meta hash
-- ARGV[1] most messages to return
-- ARGV[2] message id to read before ('' for the newest page)
-- returns {0} when the session does not exist, {1, 0} when no message has the id `before`,
--         else {1, 1, index of the page's first message, {message, ...}}
local size = redis.call('LLEN', KEYS[1])
if size == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  return {0}
end
local stop = size  -- the page ends just before this index
if ARGV[2] ~= '' then
  local prefix = '{"id":' .. cjson.encode(ARGV[2]) .. ','
  local found, high = -1, size - 1
  while found < 0 and high >= 0 do
    local low = math.max(0, high - 15)
    local window = redis.call('LRANGE', KEYS[1], low, high)
    for i = #window, 1, -1 do
      if string.sub(window[i], 1, #prefix) == prefix then
        found = low + i - 1
        break
      end
    end
    high = low - 1
  end
  if found < 0 then
    return {1, 0}
  end
  stop = found
end
local start = math.max(0, stop - tonumber(ARGV[1]))
if stop == 0 then
  return {1, 1, 0, {}}
end
return {1, 1, start, redis.call('LRANGE', KEYS[1], start, stop - 1)}
