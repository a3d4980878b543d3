-- unpick.lua: give back what pick.lua took for an admission its client side refused
-- (admit.lua on the tenant's shard said no while the pick said yes), once per lease.
--
-- Contract (checked against src/limits/scripts/unpick.rs by tests/script_contracts.rs):
--
-- KEYS (under the pool's hash tag):
--   1  order              zset   key id -> priority rank * 2^42 + last pick
--   2  pk_rpm             hash   the picked provider key's request window (admit.lua's)
--   3  pk_tpm             hash   its token window
--   4  guard              string {tag}:unpick:<lease token>: set (for 2 minutes) by the
--                                first run, so a repeat gives back nothing
-- ARGV:
--   1  picked             the provider key's id
--   2  second             the second whose buckets took its units (pick.lua's answer)
--   3  requests           requests taken then (0 or 1)
--   4  tokens             tokens taken then (>= 0)
--   5  previous           its order score before the pick
--   6  score              its order score the pick set
--   7  time_shift_ms      added to the clock (0 in production)
--   8  now_ms             0 = the Redis server's TIME (production); else this instant
-- Returns {code, now_ms}.
-- CODES:
--   0  duplicate          this lease was given back already: nothing changed
--   1  returned           its units left the buckets that still count them
--
-- A unit leaves its bucket only while that second is in the window (after, it counts
-- nowhere anyway); a bucket left empty is removed as if nothing had been taken in it
-- (and 'lo' moves to the next second that has one). The pick time goes back to the one
-- before only while it is still the pick's (no later pick of that key since).

local picked = ARGV[1]
local second = tonumber(ARGV[2])
local requests = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local previous, score = ARGV[5], ARGV[6]
local shift = tonumber(ARGV[7])
local pinned = tonumber(ARGV[8])
assert(picked and #picked > 0, 'picked')
assert(second and requests and requests >= 0 and tokens and tokens >= 0, 'units')
assert(shift and pinned, 'time')

local now = pinned + shift
if pinned == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end
local b = math.floor(now / 1000)
local function int(x) return string.format('%d', x) end

if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', 120000) then return {0, now} end

-- Takes `amount` back out of `key`'s bucket `second`, if the window still counts it.
local function untake(key, amount)
  if amount <= 0 or second < b - 60 then return end
  local h = redis.call('HMGET', key, second, 's', 'lo')
  local cur, sum, lo = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3])
  if not cur then return end
  local new = math.max(0, cur - amount)
  sum = math.max(0, sum - (cur - new))
  if new > 0 then
    redis.call('HSET', key, second, int(new), 's', int(sum))
    return
  end
  redis.call('HDEL', key, second)
  if lo == second then
    lo = second + 1
    while lo <= b and redis.call('HEXISTS', key, lo) == 0 do lo = lo + 1 end
    if lo > b then
      redis.call('DEL', key)
      return
    end
  end
  redis.call('HSET', key, 's', int(sum), 'lo', lo)
end

untake(KEYS[2], requests)
untake(KEYS[3], tokens)
if score ~= '' and previous ~= '' and tonumber(redis.call('ZSCORE', KEYS[1], picked) or '') == tonumber(score) then
  redis.call('ZADD', KEYS[1], 'XX', previous, picked)
end
return {1, now}
