-- Settles a token reservation: KEYS[1] the token window; ARGV: id, estimated cost, actual.
local old = ARGV[1] .. ':' .. ARGV[2]
local at = redis.call('ZSCORE', KEYS[1], old)
if not at then return 0 end
redis.call('ZREM', KEYS[1], old)
redis.call('ZADD', KEYS[1], at, ARGV[1] .. ':' .. ARGV[3])
local sum = redis.call('INCRBY', KEYS[1] .. ':sum', tonumber(ARGV[3]) - tonumber(ARGV[2]))
if sum < 0 then redis.call('SET', KEYS[1] .. ':sum', 0, 'KEEPTTL') end
return 1
