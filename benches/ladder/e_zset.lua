-- ladder e: d + what a concurrency slot adds: ZCOUNT of the live leases and ZADD of this
-- one (KEYS[2], a sorted set; the member is this call's microsecond, the score its expiry).
local t = redis.call('TIME')
local bs = t[1]
local h = redis.call('HMGET', KEYS[1], 's', 'lo', bs, 'ts', 'tlo', 't' .. bs)
redis.call('HSET', KEYS[1], bs, (tonumber(h[3]) or 0) + 1, 's', (tonumber(h[1]) or 0) + 1,
  't' .. bs, (tonumber(h[6]) or 0) + 100, 'ts', (tonumber(h[4]) or 0) + 100)
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local in_flight = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), t[1] .. t[2])
return 0
