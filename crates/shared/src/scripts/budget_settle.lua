-- Settles a hold: KEYS: budgets. ARGV: the amount held, the amount spent, then ttl_ms per
-- budget (0: never expires). Returns, per budget, its spend before and after.
local out = {}
for i, k in ipairs(KEYS) do
  local held = redis.call('HINCRBY', k, 'held', -tonumber(ARGV[1]))
  if held < 0 then redis.call('HSET', k, 'held', 0) end
  local after = redis.call('HINCRBY', k, 'spent', ARGV[2])
  local ttl = tonumber(ARGV[i + 2])
  if ttl > 0 then redis.call('PEXPIRE', k, ttl) end
  out[2 * i - 1] = after - tonumber(ARGV[2])
  out[2 * i] = after
end
return out
