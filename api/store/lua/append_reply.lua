-- Append to a turn's reply log. Each entry's id is fixed by the caller (the reply's length in bytes
-- so far), so an append that is sent again after a lost reply is refused by XADD and applied once.
-- KEYS[1] reply log (a stream)
-- ARGV[1] entry id, ARGV[2] field, ARGV[3] value
-- ARGV[4] the log's ttl in milliseconds from now
-- returns 1 if appended, 0 if that entry was there already
local added = redis.pcall('XADD', KEYS[1], ARGV[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if type(added) == 'table' and added.err then
  return 0
end
return 1
