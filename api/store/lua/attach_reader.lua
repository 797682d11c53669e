-- A reader asks for the reply of the turn in flight: note that someone waits for it, so that its
-- producer logs it and its commit ends the log, and say which turn it is.
-- KEYS[1] lock (its value is the turn's token), KEYS[2] readers flag
-- ARGV[1] how long the flag lasts unless asked again, in milliseconds
-- ARGV[2] the token the reader follows, or '' for whichever turn is in flight
-- returns the token of the turn in flight (the one asked for, when given), else false
local token = redis.call('GET', KEYS[1])
if not token or (ARGV[2] ~= '' and token ~= ARGV[2]) then
  return false
end
redis.call('SET', KEYS[2], token, 'PX', ARGV[1])
return token
