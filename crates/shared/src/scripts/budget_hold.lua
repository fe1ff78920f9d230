-- Holds an estimate against USD budgets, all or none. KEYS: budgets (hashes of `spent` and
-- `held`, nano-dollars). ARGV: amount, then (limit, ttl_ms) per budget (ttl 0: never expires),
-- then (for a slice) the amount wanted. A budget has room while spent + held < limit. A slice
-- holds what was wanted or the smallest room, whichever is less, but never less than the
-- amount. Returns {1, held, 0} or {0, index, spent}.
local amount = tonumber(ARGV[1])
local want = tonumber(ARGV[2 * #KEYS + 2] or ARGV[1])
local room = nil
for i, k in ipairs(KEYS) do
  local v = redis.call('HMGET', k, 'spent', 'held')
  local spent = tonumber(v[1]) or 0
  local left = tonumber(ARGV[2 * i]) - spent - (tonumber(v[2]) or 0)
  if left <= 0 then
    return {0, i - 1, spent}
  end
  if room == nil or left < room then room = left end
end
local held = amount
if want > amount then held = math.max(amount, math.min(want, room)) end
for i, k in ipairs(KEYS) do
  redis.call('HINCRBY', k, 'held', held)
  local ttl = tonumber(ARGV[2 * i + 1])
  if ttl > 0 then redis.call('PEXPIRE', k, ttl) end
end
return {1, held, 0}
