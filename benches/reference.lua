-- reference.lua: the minimal script a Redis rate limiter could run per decision, measured
-- beside keyward's scripts by `cargo bench --bench admit` (the yardstick of issue 16: what
-- one decision costs Redis at least). Not part of the product: no Rust counterpart.
--
-- One counter, an exact sliding window of 60 one-second buckets, in the bucket style of
-- lua/admit.lua's window(): one hash per counter with a field per second with traffic,
-- 's' (the sum of those fields) and 'lo' (the oldest second that has a field). A decision
-- is one HMGET, one HSET and, on a second's first take, one PEXPIRE; about once a second
-- the seconds that left the window are removed.
--
-- KEYS:
--   1  window   hash   1-second bucket -> units taken in it; 's' = their sum, 'lo' = the
--                      oldest bucket that may exist
-- ARGV:
--   1  limit    units per 60 s (> 0)
--   2  amount   units this decision takes (>= 0)
-- Reply: {1, sum after the take} when taken; {0, sum} when the window is full (nothing
-- taken).

local key = KEYS[1]
local limit, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
assert(key and limit and limit > 0 and amount and amount >= 0, 'reference.lua: bad arguments')

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

if sum + amount > limit then return {0, sum} end
if lo then
  redis.call('HSET', key, b, cur + amount, 's', sum + amount, 'lo', lo)
else
  redis.call('HSET', key, b, cur + amount, 's', sum + amount, 'lo', b)
end
if cur == 0 then redis.call('PEXPIRE', key, 62000) end
return {1, sum + amount}
