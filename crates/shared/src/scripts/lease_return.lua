-- Gives back the calls of a lease not spent (window.lua comes first). KEYS[1]: the window.
-- ARGV: its limit, the lease id, the calls granted, the calls unspent. Returns the calls given
-- back (none once the lease's entries have left the window).
local k = KEYS[1]
local limit, id = tonumber(ARGV[1]), ARGV[2]
local granted, unused = tonumber(ARGV[3]), tonumber(ARGV[4])
if limit <= EXACT_UP_TO then
  local members = {}
  for j = granted - unused + 1, granted do members[#members + 1] = id .. ':' .. j end
  if #members == 0 then return 0 end
  return redis.call('ZREM', k, unpack(members))
end
local b, c, nk = k .. ':b', k .. ':c', k .. ':n'
local run = 'L' .. id
local have = tonumber(redis.call('HGET', c, run) or '0')
local back = math.min(unused, have)
if back <= 0 then return 0 end
if back == have then
  redis.call('HDEL', c, run)
  redis.call('ZREM', b, run)
else
  redis.call('HINCRBY', c, run, -back)
end
local total = tonumber(redis.call('GET', nk) or '0')
if total > 0 then redis.call('DECRBY', nk, math.min(back, total)) end
return back
