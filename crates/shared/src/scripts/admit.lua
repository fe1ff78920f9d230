-- Prunes, checks and (only if all fit) records, on Redis's clock. KEYS: windows. ARGV: member
-- id, then (limit, per_ms) per window. Returns {1, remaining...} or {0, index, free_in_ms}.
-- (window.lua comes first: `now`, window_used, window_free, window_add.)
local id = ARGV[1]
local worst, worst_free = 0, -1
local used = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local per = tonumber(ARGV[2 * i + 1])
  used[i] = window_used(KEYS[i], limit, per)
  if used[i] >= limit then
    local free = window_free(KEYS[i], limit, per)
    if free > worst_free then worst, worst_free = i, free end
  end
end
if worst > 0 then return {0, worst - 1, worst_free} end
local out = {1}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  out[i + 1] = limit - window_add(KEYS[i], limit, tonumber(ARGV[2 * i + 1]), id, used[i])
end
return out
