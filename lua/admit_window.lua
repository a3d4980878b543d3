-- admit_window.lua: decide one light admission of a client key whose limits are its
-- windows (RPM and/or TPM) and/or a concurrency limit: no tracked balance, no quota entry,
-- so no lease record (its signed lease carries what its report settles). The common key's
-- path, kept apart from lua/admit.lua so it reads eight arguments and defines no
-- function: its cost is the reference's (benches/reference.lua) plus the second window,
-- plus, under a concurrency limit, a count and an add in the lease set.
--
-- Contract (checked against src/limits/scripts/admit_window.rs by tests/script_contracts.rs):
-- every key and argument by position and name, then the reply codes.
--
-- KEYS (under the tenant's hash tag):
--   1  rpm                hash   the key's two windows, exactly as lua/admit.lua's KEYS 1
--                                (1-second bucket -> requests, 's', 'lo'; tokens under the
--                                prefix 't'): the two scripts read and write the same
--                                fields, so a key that gains or loses a limit keeps its
--                                counts
--   2  leases             zset   lease token -> expiry (ms), lua/admit.lua's KEYS 2: read
--                                and written only under a concurrency limit
--   3  ld                 hash   lua/admit.lua's KEYS 3 (lease records): never written
--                                here; read by the purge, and its expiry kept with the
--                                lease set's (under a concurrency limit only)
-- ARGV (a limit of 0 means no limit):
--   1  rpm_limit          requests per minute (0 = unlimited)
--   2  tpm_limit          tokens per minute (0 = unlimited)
--   3  tokens             tokens to reserve (>= 0)
--   4  lease_ttl_ms       (> 0): the answer's lease expiry is now + this
--   5  time_shift_ms      added to the clock (0 in production)
--   6  now_ms             0 = the Redis server's TIME (production); else this instant
--   7  concurrency_limit  requests in flight (0 = unlimited: the lease set is not read)
--   8  lease_token        unique per request; its slot's member in the lease set (read
--                         only under a concurrency limit)
-- Returns lua/admit.lua's reply without quota entries: {code, a, now_ms, req_used,
--          tok_used, req_reset_ms, tok_reset_ms, in_flight (0 without a concurrency
--          limit), bal_rem (-1), quota_index (0), quota_exhausted (0)}
-- CODES:
--   0  admitted           a = lease expiry ms
--   1  requests           requests window full; a = retry ms
--   2  tokens             tokens window full; a = retry ms
--   3  concurrency        all slots in use; a = retry ms
--
-- Same windows, settling, expiry and retry times as lua/admit.lua (see its header): an
-- admission at second b counts buckets b-60..b; the hash lives 62 s from a second's first
-- take. Three calls on the common path (TIME, one HMGET, one HSET), a PEXPIRE on a
-- second's first take, and about once a second the removal of the seconds that left.
-- The parts used only then, or on a denial, are written inline in their branch: a Lua
-- function is a closure made on every call.
--
-- The slot (a concurrency limit): the lease is a member of the key's lease set with its
-- expiry and nothing else (no record in ld), exactly as lua/admit.lua's leases, so both
-- scripts count every lease of the key whichever admitted it: live leases (expiry
-- after now) are counted (ZCOUNT), the lease is added (ZADD), and the set's and ld's
-- expiry follow lua/admit.lua's rule (set to ttl + 3000 when no lease was live, else
-- raised to it on a second's first decision when below ttl + 2000). Its report
-- (lua/report.lua's light path) removes it from the set, once (its duplicate guard);
-- its renewal (lua/renew.lua's light path) moves its expiry. Two calls more on the
-- common path (ZCOUNT, ZADD).
-- The purge: on a second's first decision (as lua/admit.lua's for a key without a
-- balance), up to 100 expired members leave the set, those without a record in ld:
-- this script's leases, and renewed light ones. Nothing else holds anything for them
-- (no balance or spend hold, no record to keep in lx for a late report: it carries its
-- data), so removing the member is all lua/admit.lua's purge would do. A lease with a
-- record (lua/admit.lua admitted it: the key's limits changed, or its names were too
-- long for a light lease) stays for lua/admit.lua's purge, which moves its record to lx
-- and releases its holds, or for its report, which settles it from ld (its holds then
-- leave once, never twice); it counts nowhere meanwhile, and ld lives as long as the set.
-- A known limit: while 100 such leases lie expired at the front of the set, this purge
-- removes nothing (it reads the 100 oldest), so a key whose every admission comes here
-- keeps its expired light leases too until lua/admit.lua purges the key or those leases
-- are reported: its set grows by its unreported leases meanwhile (counting stays exact:
-- only live leases count).

local rpm_limit = tonumber(ARGV[1])
local tpm_limit = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local shift = tonumber(ARGV[5])
local pinned = tonumber(ARGV[6])
local conc_limit = tonumber(ARGV[7])
-- One assert for all: every amount within 2^53 - 1, where a Lua double is exact.
assert(#KEYS == 3 and #ARGV == 8 and rpm_limit and rpm_limit >= 0 and tpm_limit and tpm_limit >= 0
  and tokens and tokens >= 0 and tokens <= 9007199254740991 and ttl and ttl > 0 and shift and pinned
  and conc_limit and conc_limit >= 0 and (conc_limit == 0 or #ARGV[8] > 0), 'arguments')
local WIN = KEYS[1]
local fmt = string.format

local now = pinned + shift
if pinned == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end
local b = math.floor(now / 1000)
local oldest = b - 60
-- '%d' writes a whole number as Redis stores it (see lua/admit.lua's int()).
local bs = fmt('%d', b)

-- A window without 'lo' is empty (whatever else it holds).
local req_used, req_lo, req_cur, tok_used, tok_lo, tok_cur = 0, nil, 0, 0, nil, 0
if rpm_limit > 0 or tpm_limit > 0 then
  local h = redis.call('HMGET', WIN, 's', 'lo', bs, 'ts', 'tlo', 't' .. bs)
  if rpm_limit > 0 then
    req_lo = tonumber(h[2])
    if req_lo then req_used, req_cur = tonumber(h[1]) or 0, tonumber(h[3]) or 0 end
  end
  if tpm_limit > 0 then
    tok_lo = tonumber(h[5])
    if tok_lo then tok_used, tok_cur = tonumber(h[4]) or 0, tonumber(h[6]) or 0 end
  end
end

-- Seconds that left a window since its last decision go (lua/admit.lua's
-- settle_window, the part after its first read).
if (req_lo and req_lo < oldest) or (tok_lo and tok_lo < oldest) then
  for _, p in ipairs({'', 't'}) do
    local sum, lo, cur
    if p == '' then sum, lo, cur = req_used, req_lo, req_cur else sum, lo, cur = tok_used, tok_lo, tok_cur end
    if lo and lo < oldest then
      local gone = {}
      if lo < oldest - 60 then
        -- Every field is older than the window (they span at most 61 seconds from 'lo').
        for s = lo, lo + 60 do gone[#gone + 1] = p .. s end
        lo = b + 1
      else
        while lo < oldest do
          local v = redis.call('HGET', WIN, p .. lo)
          if v then
            sum = sum - tonumber(v)
            gone[#gone + 1] = p .. lo
          end
          lo = lo + 1
        end
        -- Move 'lo' on to the oldest second that has a field, for the reset time.
        while lo <= b and redis.call('HEXISTS', WIN, p .. lo) == 0 do lo = lo + 1 end
      end
      if lo > b then
        gone[#gone + 1] = p .. 's'
        gone[#gone + 1] = p .. 'lo'
        redis.call('HDEL', WIN, unpack(gone))
        sum, lo, cur = 0, nil, 0
      else
        if #gone > 0 then redis.call('HDEL', WIN, unpack(gone)) end
        redis.call('HSET', WIN, p .. 's', fmt('%d', sum), p .. 'lo', lo)
      end
      if p == '' then req_used, req_lo, req_cur = sum, lo, cur else tok_used, tok_lo, tok_cur = sum, lo, cur end
    end
  end
end

-- The slot: live leases counted before any check (every answer says how many), after
-- the purge on a second's first decision (lua/admit.lua's new_second: nothing taken in
-- the key's windows this second yet, or every decision when it has no window).
local in_flight, LEASES, nows, new_second = 0, nil, nil, false
if conc_limit > 0 then
  LEASES, nows = KEYS[2], fmt('%d', now)
  new_second = (rpm_limit > 0 and req_cur == 0) or (rpm_limit == 0 and (tpm_limit == 0 or tok_cur == 0))
  if new_second then
    local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', nows, 'LIMIT', 0, 100)
    if #expired > 0 then
      -- Only members without a record (see the header); a missing field reads false.
      local gone = {}
      for i, data in ipairs(redis.call('HMGET', KEYS[3], unpack(expired))) do
        if not data then gone[#gone + 1] = expired[i] end
      end
      if #gone > 0 then redis.call('ZREM', LEASES, unpack(gone)) end
    end
  end
  in_flight = redis.call('ZCOUNT', LEASES, '(' .. nows, '+inf')
end

-- Milliseconds until the oldest counted bucket leaves a window (0 when empty).
local req_reset, tok_reset = 0, 0
if req_lo then req_reset = (req_lo + 61) * 1000 - now end
if tok_lo then tok_reset = (tok_lo + 61) * 1000 - now end

-- A denial: the milliseconds until `sum + add <= limit` in the refusing window as old
-- buckets leave it (lua/admit.lua's wait_for; denials only, so every bucket is read).
local code, p, sum, add, limit = 0, '', 0, 0, 0
if rpm_limit > 0 and req_used + 1 > rpm_limit then
  code, p, sum, add, limit = 1, '', req_used, 1, rpm_limit
elseif tpm_limit > 0 and tok_used + tokens > tpm_limit then
  code, p, sum, add, limit = 2, 't', tok_used, tokens, tpm_limit
end
if code > 0 then
  local all = redis.call('HGETALL', WIN)
  local buckets = {}
  for i = 1, #all, 2 do
    local name = all[i]
    local f = nil
    if p == '' then
      f = tonumber(name)
    elseif string.sub(name, 1, 1) == p then
      f = tonumber(string.sub(name, 2))
    end
    if f then buckets[f] = tonumber(all[i + 1]) end
  end
  local wait = 61000
  for k = 1, 61 do
    sum = sum - (buckets[oldest + k - 1] or 0)
    if sum + add <= limit then
      wait = (b + k) * 1000 - now
      break
    end
  end
  return {code, wait, now, req_used, tok_used, req_reset, tok_reset, in_flight, -1, 0, 0}
end
if conc_limit > 0 and in_flight >= conc_limit then
  -- Until the first live lease expires (lua/admit.lua's earliest_lease_expiry; one is
  -- live, since in_flight >= 1).
  local first = redis.call('ZRANGEBYSCORE', LEASES, '(' .. nows, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  return {3, math.max(tonumber(first[2]) - now, 1), now, req_used, tok_used, req_reset, tok_reset,
          in_flight, -1, 0, 0}
end

-- Admitted: both takes in one HSET; the hash lives 62 s from a second's first take
-- (tokens 0 take nothing: a light lease's report settles from its signed lease).
local taken, first = {}, false
if rpm_limit > 0 then
  taken[1], taken[2], taken[3], taken[4] = bs, fmt('%d', req_cur + 1), 's', fmt('%d', req_used + 1)
  if not req_lo then
    taken[5], taken[6] = 'lo', bs
    req_lo, req_reset = b, 61000 + b * 1000 - now
  end
  first = req_cur == 0
  req_used = req_used + 1
end
if tpm_limit > 0 and tokens > 0 then
  local n = #taken
  taken[n + 1], taken[n + 2], taken[n + 3], taken[n + 4] =
    't' .. bs, fmt('%d', tok_cur + tokens), 'ts', fmt('%d', tok_used + tokens)
  if not tok_lo then
    taken[n + 5], taken[n + 6] = 'tlo', bs
    tok_lo, tok_reset = b, 61000 + b * 1000 - now
  end
  first = first or tok_cur == 0
  tok_used = tok_used + tokens
end
if #taken > 0 then
  redis.call('HSET', WIN, unpack(taken))
  if first then redis.call('PEXPIRE', WIN, 62000) end
end
if conc_limit > 0 then
  redis.call('ZADD', LEASES, fmt('%d', now + ttl), ARGV[8])
  -- lua/admit.lua's rule for the lease keys' expiry (see its end), ld's kept with the
  -- set's: a record lua/admit.lua wrote lives as long as its member.
  if in_flight == 0 or (new_second and redis.call('PTTL', LEASES) < ttl + 2000) then
    redis.call('PEXPIRE', LEASES, ttl + 3000)
    redis.call('PEXPIRE', KEYS[3], ttl + 3000)
  end
  in_flight = in_flight + 1
end
return {0, now + ttl, now, req_used, tok_used, req_reset, tok_reset, in_flight, -1, 0, 0}
