-- Request windows, shared by the admit and pick scripts (this file is put in front of each).
-- Up to EXACT_UP_TO a window is exact: a sorted set of admission times (member: the call's id).
-- Above, it counts in runs, at most BUCKETS of them (plus the one filling) however large the
-- limit: `<k>:b` (sorted set: a run's first call time -> scored by its last call), `<k>:c`
-- (hash: run -> calls) and `<k>:n` (calls in all runs). A run counts in full until its last
-- call leaves the window, so a window never holds more than its limit in any trailing `per`;
-- a full one frees up to per/BUCKETS later than an exact log would. The same rule as
-- memory.rs's `Window`.
--
-- A lease (window_lease) counts calls a replica will spend over the next `lease_ms` at the
-- latest time it may spend them, now + lease_ms, so each leaves the window no earlier than a
-- call made then; every key lives LEASE_SLACK (the longest lease_ms) longer than the window
-- for it, so a plain call's expiry never cuts a lease's short.
local EXACT_UP_TO, BUCKETS, LEASE_SLACK = 4096, 1024, 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Calls in window k now (its old entries pruned).
local function window_used(k, limit, per)
  if limit <= EXACT_UP_TO then
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now - per)
    return redis.call('ZCARD', k)
  end
  local b, c, nk = k .. ':b', k .. ':c', k .. ':n'
  local total = tonumber(redis.call('GET', nk) or '0')
  local old = redis.call('ZRANGEBYSCORE', b, '-inf', now - per)
  if #old > 0 then
    for _, run in ipairs(old) do total = total - tonumber(redis.call('HGET', c, run) or '0') end
    redis.call('HDEL', c, unpack(old))
    redis.call('ZREMRANGEBYSCORE', b, '-inf', now - per)
    if total < 0 or redis.call('ZCARD', b) == 0 then total = 0 end
    -- the count keeps the runs' expiry (window_add), so the three keys lapse together
    local ttl = redis.call('PTTL', b)
    if ttl <= 0 then ttl = per + LEASE_SLACK end
    redis.call('SET', nk, total, 'PX', ttl)
  end
  return total
end

-- In how many ms full window k frees up (asked only when it is full).
local function window_free(k, limit, per)
  local z = k
  if limit > EXACT_UP_TO then z = k .. ':b' end
  local oldest = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')[2]
  if oldest then return tonumber(oldest) + per - now end
  return per
end

-- Counts a call (id) in window k, which held n calls (window_used, in this script); returns
-- the calls in it after.
local function window_add(k, limit, per, id, n)
  if limit <= EXACT_UP_TO then
    redis.call('ZADD', k, now, id)
    redis.call('PEXPIRE', k, per + LEASE_SLACK)
    return n + 1
  end
  local b, c, nk = k .. ':b', k .. ':c', k .. ':n'
  local step = math.max(1, math.floor(per / BUCKETS))
  -- the newest run begun by now (a lease's run is scored ahead, and named `L<id>`)
  local run = redis.call('ZREVRANGEBYSCORE', b, now, '-inf', 'LIMIT', 0, 1)[1]
  local fresh = run == nil or tonumber(run) == nil or now - tonumber(run) >= step
  if fresh then run = tostring(now) end
  redis.call('ZADD', b, now, run)
  redis.call('HINCRBY', c, run, 1)
  local total = redis.call('INCR', nk)
  -- a run's calls all come within `step` of its start: expiring the three keys `per + step`
  -- after the newest run starts outlasts every call's time in the window, so their expiry is
  -- set when a run starts, not on every call
  if fresh then
    redis.call('PEXPIRE', b, per + step + LEASE_SLACK)
    redis.call('PEXPIRE', c, per + step + LEASE_SLACK)
    redis.call('PEXPIRE', nk, per + step + LEASE_SLACK)
  end
  return total
end

-- Counts g calls of lease `id` in window k (which held n), at time `at` (now + lease_ms);
-- returns the calls in it after. An exact window gets g members `id:1`..`id:g`; a large one a
-- run of its own, `L<id>`, scored `at`.
local function window_lease(k, limit, per, id, n, g, at)
  if limit <= EXACT_UP_TO then
    local args = {}
    for j = 1, g do
      args[#args + 1] = at
      args[#args + 1] = id .. ':' .. j
    end
    redis.call('ZADD', k, unpack(args))
    redis.call('PEXPIRE', k, per + LEASE_SLACK)
    return n + g
  end
  local b, c, nk = k .. ':b', k .. ':c', k .. ':n'
  local step = math.max(1, math.floor(per / BUCKETS))
  local run = 'L' .. id
  redis.call('ZADD', b, at, run)
  redis.call('HINCRBY', c, run, g)
  local total = redis.call('INCRBY', nk, g)
  redis.call('PEXPIRE', b, per + step + LEASE_SLACK)
  redis.call('PEXPIRE', c, per + step + LEASE_SLACK)
  redis.call('PEXPIRE', nk, per + step + LEASE_SLACK)
  return total
end
