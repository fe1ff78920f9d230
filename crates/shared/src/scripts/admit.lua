-- Prunes, checks and (only if all fit) records, on Redis's clock. KEYS: windows. ARGV: member
-- id, then (limit, per_ms) per window, then the calls wanted as a lease (1: none) and its ms.
-- Returns {1, remaining..., granted} or {0, index, free_in_ms}: a lease reserves up to its
-- calls in every window at once, at most the room the fullest has (window_lease, under the id).
-- (window.lua comes first: `now`, window_used, window_free, window_add, window_lease.)
local id = ARGV[1]
local worst, worst_free = 0, -1
local used = {}
local room = math.huge
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local per = tonumber(ARGV[2 * i + 1])
  used[i] = window_used(KEYS[i], limit, per)
  if used[i] >= limit then
    local free = window_free(KEYS[i], limit, per)
    if free > worst_free then worst, worst_free = i, free end
  end
  room = math.min(room, limit - used[i])
end
if worst > 0 then return {0, worst - 1, worst_free} end
local lease = tonumber(ARGV[2 * #KEYS + 2] or '1')
local granted = 1
if lease > 1 then granted = math.min(lease, room) end
local at = now + tonumber(ARGV[2 * #KEYS + 3] or '0')
local out = {1}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local per = tonumber(ARGV[2 * i + 1])
  local after
  if granted > 1 then
    after = window_lease(KEYS[i], limit, per, id, used[i], granted, at)
  else
    after = window_add(KEYS[i], limit, per, id, used[i])
  end
  out[i + 1] = limit - after
end
out[#KEYS + 2] = granted
return out
