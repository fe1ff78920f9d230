-- Chooses and reserves in one step. KEYS: per candidate, in preference order, its request
-- window and its token window; then, for a session's pick, the session's key. ARGV: member id,
-- `least` or `first`, then per candidate (limit, per_ms, token_limit, token_cost); a limit of
-- 0 means unbudgeted, a token limit of 0 no token budget; then the calls wanted as a lease
-- (1: none) and the lease's ms; then, for a session, its ttl in ms.
-- Returns {1, index, stick, granted, tokens} or {0, free_in_ms}; stick: 0 no session, 1 the
-- session's key (hit), 2 a session new here (miss), 3 the session's key could not serve
-- (moved); granted: the calls reserved (more than 1 only for a lease, at most what a budgeted
-- window has room for; an unbudgeted one counts them for its ranking); tokens: what was
-- reserved in the chosen key's token window (0: it has none). A lease on a key with a token
-- window reserves one estimate (the asker's) per call: at most a tenth of the window's limit
-- and the room it has left, and only where that is two estimates or more (else one call).
--
-- A budgeted window is a request window (window.lua, which comes first: exact up to 4096, in
-- runs above). An
-- unbudgeted one only ranks, so it is two per-window counters (this window and the last one,
-- weighted by how much of the last still overlaps): O(1), whatever the traffic. A token window
-- is a sorted set of `id:tokens` members with a running sum beside it (`<key>:sum`): members
-- leaving the window are subtracted once, so the check is O(1) amortised.
local least = ARGV[2] == 'least'
local ncand = math.floor(#KEYS / 2)
local session = nil
if #KEYS % 2 == 1 then session = KEYS[#KEYS] end
local best, best_n, earliest = 0, -1, -1
local function tokens_used(k, per)
  local sum = tonumber(redis.call('GET', k .. ':sum') or '0')
  local old = redis.call('ZRANGEBYSCORE', k, '-inf', now - per)
  if #old > 0 then
    for _, m in ipairs(old) do sum = sum - tonumber(string.match(m, ':(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now - per)
    if sum < 0 or redis.call('ZCARD', k) == 0 then sum = 0 end
    redis.call('SET', k .. ':sum', sum, 'PX', per + LEASE_SLACK)
  end
  return sum
end
-- Tokens in candidate i's token window, as room(i) found them (a lease sizes its slice by them).
local tused = {}
-- Calls in candidate i's window when it has room (nil when it has none: `earliest` then
-- says when it frees up).
local function room(i)
  local limit = tonumber(ARGV[4 * i - 1])
  local per = tonumber(ARGV[4 * i])
  local tlimit = tonumber(ARGV[4 * i + 1])
  local tk = KEYS[2 * i]
  if tlimit > 0 then
    local cost = math.min(tonumber(ARGV[4 * i + 2]), tlimit)
    local used = tokens_used(tk, per)
    tused[i] = used
    if used + cost > tlimit then
      local must_free = used + cost - tlimit
      local free = per
      local all = redis.call('ZRANGE', tk, 0, -1, 'WITHSCORES')
      for j = 1, #all, 2 do
        local m = tonumber(string.match(all[j], ':(%d+)$'))
        if m >= must_free then free = tonumber(all[j + 1]) + per - now break end
        must_free = must_free - m
      end
      if earliest < 0 or free < earliest then earliest = free end
      return nil
    end
  end
  local k = KEYS[2 * i - 1]
  if limit == 0 then
    local slot = math.floor(now / per)
    local cur = tonumber(redis.call('GET', k .. ':' .. slot) or '0')
    local prev = tonumber(redis.call('GET', k .. ':' .. (slot - 1)) or '0')
    return cur + prev * (1 - (now % per) / per)
  end
  local n = window_used(k, limit, per)
  if n < limit then return n end
  local free = window_free(k, limit, per)
  if earliest < 0 or free < earliest then earliest = free end
  return nil
end
-- a session keeps the key it names while that key has room
local stick, stuck = 0, 0
if session then
  local named = redis.call('GET', session)
  stick = 2
  if named then
    stick = 3
    for i = 1, ncand do
      if KEYS[2 * i - 1] == named then stuck = i end
    end
  end
  if stuck > 0 then
    local n = room(stuck)
    if n then best, best_n, stick = stuck, n, 1 end
  end
end
if best == 0 then
  for i = 1, ncand do
    if i ~= stuck then
      local n = room(i)
      if n then
        if best == 0 or n < best_n then best, best_n = i, n end
        if not least then break end
      end
    end
  end
end
if best == 0 then return {0, earliest} end
local per = tonumber(ARGV[4 * best])
local k = KEYS[2 * best - 1]
local limit = tonumber(ARGV[4 * best - 1])
local tlimit = tonumber(ARGV[4 * best + 1])
local granted = 1
local lease = tonumber(ARGV[3 + 4 * ncand])
local leasing = lease > 1
local cost = 0
if tlimit > 0 then cost = math.min(tonumber(ARGV[4 * best + 2]), tlimit) end
if leasing and tlimit > 0 then
  local room = tlimit - tused[best]
  local slice = math.min(cost * lease, math.floor(tlimit / 10), room)
  if cost < 1 or slice < 2 * cost then leasing = false else lease = math.floor(slice / cost) end
end
if limit == 0 then
  -- an unbudgeted lease is only counted for the ranking: nothing to give back
  if leasing then granted = lease end
  local c = k .. ':' .. math.floor(now / per)
  redis.call('INCRBY', c, granted)
  redis.call('PEXPIRE', c, 2 * per)
else
  if leasing then granted = math.min(lease, limit - best_n) end
  if granted > 1 then
    window_lease(k, limit, per, ARGV[1], best_n, granted, now + tonumber(ARGV[4 + 4 * ncand]))
  else
    window_add(k, limit, per, ARGV[1], best_n)
  end
end
if tlimit > 0 then
  -- a lease's tokens count from the latest moment they may be spent, as its calls do
  local tk, at = KEYS[2 * best], now
  if granted > 1 then cost, at = cost * granted, now + tonumber(ARGV[4 + 4 * ncand]) end
  redis.call('ZADD', tk, at, ARGV[1] .. ':' .. cost)
  redis.call('INCRBY', tk .. ':sum', cost)
  redis.call('PEXPIRE', tk, per + LEASE_SLACK)
  redis.call('PEXPIRE', tk .. ':sum', per + LEASE_SLACK)
end
if session then
  redis.call('SET', session, k, 'PX', tonumber(ARGV[5 + 4 * ncand]))
end
return {1, best - 1, stick, granted, cost}
