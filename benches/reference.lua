-- reference.lua: the minimal decision a bench compares lua/admit.lua with. One counter,
-- an exact sliding window of one minute in admit.lua's bucket style, nothing else: no
-- lease, no second limit, no quota. Not used by keyward; benches only.
--
-- KEYS:
--   1  window  hash   1-second bucket -> requests admitted in it; 's' = their sum, 'lo' =
--                     the oldest bucket that may exist (as admit.lua's windows)
-- ARGV:
--   1  limit   requests per minute (>= 1)
-- Returns {code, a}
-- CODES:
--   0  admitted  a = requests counted in the window now
--   1  requests  the window is full; a = 0 (no retry time: the reference does not
--                compute one)
--
-- The window counts buckets b-60..b at second b, like admit.lua. The common path is three
-- calls: TIME, one HMGET (sum, 'lo', this second), one HSET; plus a PEXPIRE on a second's
-- first take, and about once a second the removal of the seconds that left.

local limit = tonumber(ARGV[1])
assert(limit and limit >= 1, 'limit')
local key = KEYS[1]
local t = redis.call('TIME')
local b = tonumber(t[1])
local oldest = b - 60

local h = redis.call('HMGET', key, 's', 'lo', b)
local sum, lo, cur = tonumber(h[1]) or 0, tonumber(h[2]), tonumber(h[3]) or 0
if lo and lo < oldest then
  if lo < oldest - 60 then
    redis.call('DEL', key)
    sum, lo, cur = 0, nil, 0
  else
    local gone = {}
    while lo < oldest do
      local v = redis.call('HGET', key, lo)
      if v then
        sum = sum - tonumber(v)
        gone[#gone + 1] = lo
      end
      lo = lo + 1
    end
    if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  end
end
if sum + 1 > limit then return {1, 0} end
if lo then
  redis.call('HSET', key, b, cur + 1, 's', sum + 1, 'lo', lo)
else
  redis.call('HSET', key, b, cur + 1, 's', sum + 1, 'lo', b)
end
if cur == 0 then redis.call('PEXPIRE', key, 62000) end
return {0, sum + 1}
