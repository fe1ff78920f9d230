-- Prunes, checks and (only if all fit) records, on Redis's clock. KEYS: windows. ARGV: member
-- id, then (limit, per_ms) per window. Returns {1, remaining...} or {0, index, free_in_ms}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local worst, worst_free = 0, -1
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local per = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - per)
  if redis.call('ZCARD', KEYS[i]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    local free = per
    if oldest[2] then free = tonumber(oldest[2]) + per - now end
    if free > worst_free then worst, worst_free = i, free end
  end
end
if worst > 0 then return {0, worst - 1, worst_free} end
local out = {1}
for i = 1, #KEYS do
  local per = tonumber(ARGV[2 * i + 1])
  redis.call('ZADD', KEYS[i], now, id)
  redis.call('PEXPIRE', KEYS[i], per)
  out[i + 1] = tonumber(ARGV[2 * i]) - redis.call('ZCARD', KEYS[i])
end
return out
