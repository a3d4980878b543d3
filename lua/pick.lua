-- pick.lua: pick a provider key from a provider's pool and take this request's units
-- from it (its request and tokens), on the pool's own hash tag {<prefix>:p:<provider>}.
--
-- Run beside admit.lua (the client's part, on the tenant's shard) when an admission
-- wants a provider key, and alone for POST /v1/select. The two are two atomic steps on
-- two slots: a refusal by one side gives the other's units back (unpick.lua, or
-- report.lua's cancel mode).
--
-- Contract (checked against src/limits/scripts/pick.rs by tests/script_contracts.rs):
--
-- KEYS (under the pool's hash tag):
--   1  def                hash   the provider's pool: '_v' -> version, '_t' -> its stamp,
--                                key id -> "max_rpm|max_tpm" (see pool_sync.lua); '_x' ->
--                                when a pick last renewed def's and order's expiry (ms)
--   2  order              zset   key id -> priority rank * 2^42 + last pick
--      A provider key's own keys are named from the same hash tag and its id (so they
--      are in the same slot): {tag}:pk:<id>:rpm and :tpm (windows as in admit.lua), :cd
--      and :susp (the time its cooldown / suspension ends, ms).
-- ARGV:
--   1  tokens             tokens to reserve (>= 0)
--   2  pool_version       the caller's version of the pool (not "")
--   3  time_shift_ms      added to the clock (0 in production)
--   4  now_ms             0 = the Redis server's TIME (production); else this instant
-- Returns {code, a, now_ms, picked, second, requests, tokens, previous, score}: the key
-- picked, the second whose buckets took its units, the request (1, or 0 when the key
-- has no RPM limit) and tokens taken (0 without a TPM limit), its order score before
-- and after (unpick.lua puts the first back while the second is still there).
-- CODES:
--   0  picked             a = 0
--   1  pool_exhausted     every provider key is cooling down, suspended or full;
--                         a = earliest recovery ms
--   2  pool_version       the pool in Redis is not the caller's version; a = the stamp
--                         of the one in Redis, 0 if none: run pool_sync.lua (or, if that
--                         stamp is later than the caller's, reload the pool from the
--                         database), then again
--
-- Provider keys are tried by priority, then least recently picked (never picked first);
-- a key is skipped while cooling down, suspended, or without room for this request in
-- its RPM/TPM windows. Windows are exact, as in admit.lua (buckets b-60..b).

local tokens = tonumber(ARGV[1])
local pool_version = ARGV[2]
local shift = tonumber(ARGV[3])
local pinned = tonumber(ARGV[4])
local MAX = 9007199254740991
assert(tokens and tokens >= 0 and tokens <= MAX, 'tokens')
assert(pool_version and pool_version ~= '', 'pool version')
assert(shift and pinned, 'time')
local SHIFT = 4398046511104 -- 2^42: order scores are priority rank * SHIFT + last pick

local now = pinned + shift
if pinned == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end
local b = math.floor(now / 1000)
local oldest = b - 60

-- '%d', not '%.0f': float formatting was the largest Lua cost (as in admit.lua).
local function int(x) return string.format('%d', x) end
local bs = int(b)
local RENEW = 3600000 -- def and order live a day from a pick; renewed at most once an hour

-- A window: admit.lua's (one field per second, 's' their sum, 'lo' the oldest second).
local function window(key)
  local h = redis.call('HMGET', key, 's', 'lo', bs)
  local sum, lo, cur = tonumber(h[1]) or 0, tonumber(h[2]), tonumber(h[3]) or 0
  if not lo then return 0, nil, 0 end
  if lo >= oldest then return sum, lo, cur end
  if lo < oldest - 60 then
    redis.call('DEL', key)
    return 0, nil, 0
  end
  local gone = {}
  while lo < oldest do
    local v = redis.call('HGET', key, lo)
    if v then
      sum = sum - tonumber(v)
      gone[#gone + 1] = lo
    end
    lo = lo + 1
  end
  while lo <= b and redis.call('HEXISTS', key, lo) == 0 do lo = lo + 1 end
  if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  if lo > b then
    redis.call('DEL', key)
    return 0, nil, 0
  end
  redis.call('HSET', key, 's', int(sum), 'lo', lo)
  return sum, lo, cur
end

local function take(key, amount, sum, lo, cur)
  if lo then
    redis.call('HSET', key, bs, int(cur + amount), 's', int(sum + amount))
  else
    redis.call('HSET', key, bs, int(cur + amount), 's', int(sum + amount), 'lo', bs)
  end
  if cur == 0 then redis.call('PEXPIRE', key, 62000) end
end

local function wait_for(key, sum, add, limit)
  local all = redis.call('HGETALL', key)
  local buckets = {}
  for i = 1, #all, 2 do
    local f = tonumber(all[i])
    if f then buckets[f] = tonumber(all[i + 1]) end
  end
  for k = 1, 61 do
    sum = sum - (buckets[oldest + k - 1] or 0)
    if sum + add <= limit then return (b + k) * 1000 - now end
  end
  return 61000
end

local head = redis.call('HMGET', KEYS[1], '_v', '_t', '_x')
if head[1] ~= pool_version then
  return {2, tonumber(head[2] or '0') or 0, now, '', 0, 0, 0, '', ''}
end
local renewed = tonumber(head[3] or '')
local tag = string.match(KEYS[1], '^(%b{})')
-- A first batch of 2: the first candidate is usually the one picked, and ZRANGE's reply
-- (a score's text per member) cost more than any other call; then 16 at a time.
local pick, earliest, start, size = nil, nil, 0, 2
while not pick do
  local batch = redis.call('ZRANGE', KEYS[2], start, start + size - 1, 'WITHSCORES')
  if #batch == 0 then break end
  -- The batch's limits in one call (the first candidate is usually the one picked, and
  -- an HMGET of sixteen fields costs Redis about what an HGET of one does).
  local ids = {}
  for i = 1, #batch, 2 do ids[#ids + 1] = batch[i] end
  local defs = redis.call('HMGET', KEYS[1], unpack(ids))
  for i = 1, #batch, 2 do
    local id = batch[i]
    local limits = defs[(i + 1) / 2] or '0|0'
    local rpm, tpm = string.match(limits, '^(%d+)|(%d+)$')
    local base = tag .. ':pk:' .. id .. ':'
    local c = {id = id, rpm = tonumber(rpm) or 0, tpm = tonumber(tpm) or 0, score = batch[i + 1],
               rank = math.floor(tonumber(batch[i + 1]) / SHIFT), krpm = base .. 'rpm', ktpm = base .. 'tpm'}
    local held = redis.call('MGET', base .. 'cd', base .. 'susp')
    local cooling = tonumber(held[1] or '0')
    local suspended = tonumber(held[2] or '0')
    local wait = math.max(0, cooling - now, suspended - now)
    if c.rpm > 0 then
      c.rsum, c.rlo, c.rcur = window(c.krpm)
      if c.rsum + 1 > c.rpm then wait = math.max(wait, wait_for(c.krpm, c.rsum, 1, c.rpm)) end
    end
    if c.tpm > 0 then
      c.tsum, c.tlo, c.tcur = window(c.ktpm)
      if tokens > c.tpm then
        wait = math.max(wait, 61000) -- this key can never take the request
      elseif c.tsum + tokens > c.tpm then
        wait = math.max(wait, wait_for(c.ktpm, c.tsum, tokens, c.tpm))
      end
    end
    if wait == 0 then
      pick = c
      break
    end
    if earliest == nil or wait < earliest then earliest = wait end
  end
  start, size = start + size, 16
end
if not pick then return {1, earliest or 61000, now, '', 0, 0, 0, '', ''} end

local requests, taken = 0, 0
if pick.rpm > 0 then
  take(pick.krpm, 1, pick.rsum, pick.rlo, pick.rcur)
  requests = 1
end
if pick.tpm > 0 then
  if tokens > 0 then take(pick.ktpm, tokens, pick.tsum, pick.tlo, pick.tcur) end
  taken = tokens
end
local score = int(pick.rank * SHIFT + now)
redis.call('ZADD', KEYS[2], score, pick.id)
-- The pool stays while it is picked from; renewing its expiry on every pick cost two
-- calls, once an hour (or on a clock that went back) costs one HSET more.
if not renewed or now - renewed >= RENEW or now < renewed then
  redis.call('HSET', KEYS[1], '_x', int(now))
  redis.call('PEXPIRE', KEYS[1], 86400000)
  redis.call('PEXPIRE', KEYS[2], 86400000)
end
-- The score as written ('%d'), not ZSCORE's text of it: unpick.lua compares them as numbers.
return {0, 0, now, pick.id, b, requests, taken, pick.score, score}
