-- Sets a budget's spend unless it has one (a start-up restore: the first replica's wins).
-- KEYS[1]: the budget. ARGV: spent, ttl_ms (0: never expires).
if redis.call('HSETNX', KEYS[1], 'spent', ARGV[1]) == 1 and tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
