-- Holds an estimate against USD budgets, all or none. KEYS: budgets (hashes of `spent` and
-- `held`, nano-dollars). ARGV: amount, then (limit, ttl_ms) per budget (ttl 0: never expires).
-- A budget has room while spent + held < limit. Returns {1, 0, 0} or {0, index, spent}.
for i, k in ipairs(KEYS) do
  local v = redis.call('HMGET', k, 'spent', 'held')
  local spent = tonumber(v[1]) or 0
  if spent + (tonumber(v[2]) or 0) >= tonumber(ARGV[2 * i]) then
    return {0, i - 1, spent}
  end
end
for i, k in ipairs(KEYS) do
  redis.call('HINCRBY', k, 'held', ARGV[1])
  local ttl = tonumber(ARGV[2 * i + 1])
  if ttl > 0 then redis.call('PEXPIRE', k, ttl) end
end
return {1, 0, 0}
