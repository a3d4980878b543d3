-- admit.lua: decide one request for one client key, all or nothing: its windows,
-- concurrency, balance and quota entries. (A provider key is picked by pick.lua, on the
-- pool's own tag.) (Over 400 lines: one decision is one atomic script, and Redis runs
-- one file.)
--
-- Contract (checked against src/limits/scripts/admit.rs by tests/script_contracts.rs):
-- every key and argument by position and name, then the reply codes.
--
-- KEYS (all under the deployment's hash tag, e.g. "{kw}"):
--   1  rpm                hash   the key's two windows: 1-second bucket -> requests
--                                admitted in it, 's' = their sum, 'lo' = the oldest bucket
--                                that may exist; and the same for tokens reserved with
--                                the prefix 't' ('t<bucket>', 'ts', 'tlo')
--   2  leases             zset   lease token -> expiry (ms)
--   3  ld                 hash   lease token -> "bucket|reserved|provider|model|api_format|pk id|pk reserved|hold|quotas"
--                                (reserved: the client's tokens in the separate token
--                                window of older releases, 0 here; quotas: "kind,counter,
--                                amount;..." what its report corrects: kt the client's
--                                tokens reserved in rpm's 't' window, tm/td tokens
--                                reserved, s? the spend hold)
--   4  bal                hash   rem, cred, ver (live balance, micro-USD), held (the holds
--                                of the leases in flight, micro-USD)
--   5  lx                 hash   lease token -> its data as in ld, for a lease this script
--                                purged after its expiry (its slot and holds released):
--                                kept for its late report (report.lua), the hash living
--                                until the latest duplicate guard of its leases lapses;
--                                beside it <lx>:e (zset token -> when its guard lapses,
--                                ms), by which entries whose guard lapsed leave (at most
--                                PURGE_BATCH per decision that purges), so it never grows past the
--                                leases that expired within a guard ttl
-- KEYS per quota entry (1 each, from KEYS[6]):
--   1  quota              the entry's base name {tag}:q:<counter id>. Its counters, all
--                         named inside the script: <base>:rm / :tm (windows as above);
--                         <base>:rd:<day> / :td:<day> (string: requests / tokens of that
--                         UTC day, days since 1970-01-01); <base>:s<d|w|m|t>:<start day>
--                         (hash 'spent', 'held': micro-USD of the period starting that
--                         day; 0 for a total, which never expires; 'nx': no hold
--                         expires before it, ms, 0 = none held) and its holds
--                         <that name>:hx (zset "<lease token>:<hold>" -> the lease's
--                         expiry, ms: 'held' is the sum of its members' holds)
-- ARGV (a limit of 0 means no limit):
--   1  rpm_limit          requests per minute (0 = unlimited)
--   2  tpm_limit          tokens per minute (0 = unlimited)
--   3  concurrency_limit  requests in flight (0 = unlimited)
--   4  tokens             tokens to reserve (>= 0)
--   5  lease_token        unique per request
--   6  lease_ttl_ms       (> 0)
--   7  lease_meta         "provider|model|api_format", stored for the report
--   8  balance_tracked    1 = standalone key with a balance, else 0
--   9  credited           micro-USD
--   10 used               micro-USD (applied in the database)
--   11 balance_version
--   12 time_shift_ms      added to the clock (0 in production; tests move the clock
--                         without sleeping)
--   13 hold               micro-USD this request holds on a tracked balance and on
--                         every spend quota entry (>= 0)
--   14 now_ms             0 = the Redis server's TIME (production); else this instant
--                         (tests pin the clock to compare with the in-process twin)
--   15 guard_ttl_ms       how long a lease's report duplicate guard outlives its expiry
--                         (> 0): a purged lease's data stays in lx that long
--   16 light              1 = write no lease record: the key has no tracked balance (0
--                         above) and only rm/rd quota entries (nothing its report
--                         corrects but the key's own 't' window), so nothing releases
--                         anything for its lease; the signed lease carries its second,
--                         its tokens reserved in 't' and lease_meta to its report
--                         (report.lua's ARGV 22). Without a concurrency limit (0 above)
--                         its lease set, ld and lx are neither read nor written
--                         (in_flight is 0); with one, its lease takes a slot as any
--                         (purge, count, and a member of the lease set) but no record
--                         in ld, as lua/admit_window.lua's; else 0
-- ARGV per quota entry (4 each, from ARGV[17]):
--   1  kind               rm tm (per minute), rd td (per UTC day), sd sw sm st (spend
--                         per UTC day, ISO week, calendar month, total)
--   2  limit              requests, tokens or micro-USD (>= 1)
--   3  seed_day           rd td and spend: the start day of the seed below (-1 = none)
--   4  seed               what the database had applied in that period (requests, tokens
--                         or micro-USD): when seed_day is the current period's start, the
--                         counter (a day's count, a spend's 'spent') takes the larger of
--                         itself and the seed (0 when missing), so a counter the store
--                         lost or one that drifted below the database heals
-- Returns {code, a, now_ms, req_used, tok_used, req_reset_ms, tok_reset_ms, in_flight, bal_rem,
--          quota_index, quota_exhausted, then per quota entry: used, reset_ms}
-- CODES:
--   0  admitted           a = lease expiry ms
--   1  requests           requests window full; a = retry ms
--   2  tokens             tokens window full; a = retry ms
--   3  concurrency        all slots in use; a = retry ms
--   4  balance_exhausted  balance exhausted, or smaller than the hold with nothing else
--                         held; a = 0
--   5  balance_committed  balance held by requests in flight; a = retry ms
--   8  quota              the quota entry quota_index (1-based) refuses; a = retry ms
--                         (0 = none: a total spent). quota_exhausted 0 = its spend is
--                         held by requests in flight (a = 1000), 1 = full
--                         (codes 6 and 7 were the pool's, now pick.lua's)
-- bal_rem is -1 when the balance is not tracked; in_flight is 0 for a light admission
-- without a concurrency limit.
-- A quota entry's used is the window's or day's count, or a spend's spent + held; its
-- reset_ms is the time until the window's oldest second leaves (0 when empty) or until
-- its period ends (0 for a total).
--
-- Quotas (checked after the key's own limits, in their order; all or nothing with
-- everything else): a spend entry admits while spent < limit and spent + held + hold <=
-- limit; the hold is added to 'held' and listed in the counter's :hx with its lease's
-- expiry (renew.lua extends it), and its report moves it to 'spent' as the actual cost
-- (report.lua). A hold leaves 'held' once, by whichever comes first: its report, the
-- purge of its expired lease here (when its key admits again), or the purge of the
-- counter's expired holds, which every decision reading the counter runs first (at most
-- PURGE_BATCH at a time): so a request never reported stops holding at its lease's
-- expiry even if its key never admits again. A counter that is missing has no holds (its
-- :hx is deleted with it), and one that holds with an empty :hx holds nothing (seen once
-- its 'nx' passed: within a lease TTL). Periods
-- are UTC, computed from `now` with the integer steps of src/quota.rs (days_from_civil).
--
-- Windows are exact: an admission at second b counts buckets b-60..b (61 buckets), so any
-- 60-second interval that contains an admitted request lies inside the buckets counted
-- when it was admitted. The cost is at most one second of extra look-back (under-
-- admission bounded by 1 s), and memory is at most 63 fields per window.
-- Time is the Redis server's (TIME), never a replica's clock (tests alone pin it, ARGV 14).

local rpm_limit = tonumber(ARGV[1])
local tpm_limit = tonumber(ARGV[2])
local conc_limit = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local token = ARGV[5]
local ttl = tonumber(ARGV[6])
local meta = ARGV[7]
local bal_tracked = ARGV[8] == '1'
local shift = tonumber(ARGV[12])
local hold = tonumber(ARGV[13])
local pinned = tonumber(ARGV[14])
local guard_ttl = tonumber(ARGV[15])
local light = ARGV[16] == '1'
-- The keys by name (see the contract above); quota entries' keys follow them.
local WIN, LEASES, LD, BAL, LX = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local QK = 5
local nq = #KEYS - QK
assert(nq >= 0 and #ARGV == 16 + 4 * nq, 'arguments')
assert(rpm_limit and rpm_limit >= 0, 'rpm limit')
assert(tpm_limit and tpm_limit >= 0, 'tpm limit')
assert(conc_limit and conc_limit >= 0, 'concurrency limit')
assert(tokens and tokens >= 0, 'tokens')
assert(token and #token > 0, 'lease token')
assert(ttl and ttl > 0, 'lease ttl')
-- Every amount stays within +-MAX (2^53 - 1), where a Lua double is exact; the live
-- balance is held within it (the caller bounds credited and used the same way).
local MAX = 9007199254740991
assert(tokens <= MAX, 'tokens')
assert(hold and hold >= 0 and hold <= MAX, 'hold')
assert(shift and pinned, 'time')
assert(guard_ttl and guard_ttl > 0 and guard_ttl <= MAX, 'guard ttl')
assert(ARGV[16] == '0' or (light and not bal_tracked), 'light')

local now = pinned + shift
if pinned == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end
local b = math.floor(now / 1000)
local oldest = b - 60

-- A whole number as Redis stores it: Lua's own conversion keeps 14 digits ("1e+14"),
-- which HINCRBY (report.lua) would then refuse. '%d' formats it as an integer (Lua
-- 5.1 casts to a 64-bit long; every amount here is whole and within 2^53), much
-- cheaper than a double's '%.0f' or '%.17g' (what Redis applies to a number argument),
-- so every number sent to Redis goes through here. And the current second's text once.
local function int(x) return string.format('%d', x) end
local bs = int(b)

-- A window holds one field per second with traffic, plus 's' (the sum of those fields)
-- and 'lo' (the oldest second that has a field), all named with the window's prefix
-- `p`: '' for requests, 't' for tokens ('t<second>', 'ts', 'tlo'), so a client key's
-- two windows share one hash (KEYS[1]) and cost one read and one write together; a
-- quota entry's window has a hash of its own (prefix ''). Reading a window is part of
-- one HMGET of the sum, 'lo' and the current second's count, plus the removal of the
-- seconds that left the window since the last decision (about once a second); taking
-- is part of one HSET.
-- The fields read() asks for: the window's sum, 'lo' and current second.
local function names(p) return p .. 's', p .. 'lo', p .. bs end

-- From what HMGET answered at `at` (names(p) there), returns the window's sum, 'lo'
-- (nil when empty) and the current second's count, after removing the seconds that
-- left it.
local function settle_window(key, p, h, at)
  local sum, lo, cur = tonumber(h[at]) or 0, tonumber(h[at + 1]), tonumber(h[at + 2]) or 0
  if not lo then return 0, nil, 0 end
  if lo >= oldest then return sum, lo, cur end
  local gone = {}
  if lo < oldest - 60 then
    -- Every field is older than the window (they span at most 61 seconds from 'lo').
    for s = lo, lo + 60 do gone[#gone + 1] = p .. s end
    gone[#gone + 1] = p .. 's'
    gone[#gone + 1] = p .. 'lo'
    redis.call('HDEL', key, unpack(gone))
    return 0, nil, 0
  end
  while lo < oldest do
    local v = redis.call('HGET', key, p .. lo)
    if v then
      sum = sum - tonumber(v)
      gone[#gone + 1] = p .. lo
    end
    lo = lo + 1
  end
  -- Move 'lo' on to the oldest second that has a field, for the reset time.
  while lo <= b and redis.call('HEXISTS', key, p .. lo) == 0 do lo = lo + 1 end
  if lo > b then
    gone[#gone + 1] = p .. 's'
    gone[#gone + 1] = p .. 'lo'
    redis.call('HDEL', key, unpack(gone))
    return 0, nil, 0
  end
  if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  redis.call('HSET', key, p .. 's', int(sum), p .. 'lo', lo)
  return sum, lo, cur
end

-- A quota entry's window (its own hash).
local function window(key)
  return settle_window(key, '', redis.call('HMGET', key, names('')), 1)
end

-- The fields that add `amount` to the current second of window `p` just read (sum,
-- lo, cur), appended to `out` (the HSET's arguments).
local function take_fields(out, p, amount, sum, lo, cur)
  out[#out + 1] = p .. bs
  out[#out + 1] = int(cur + amount)
  out[#out + 1] = p .. 's'
  out[#out + 1] = int(sum + amount)
  if not lo then
    out[#out + 1] = p .. 'lo'
    out[#out + 1] = bs
  end
end

-- Writes what take_fields() gathered. The hash lives 62 s from a second's first take,
-- which outlasts that second's 61 s in the window; later seconds extend it on their own
-- first take (`first`).
local function take(key, fields, first)
  redis.call('HSET', key, unpack(fields))
  if first then redis.call('PEXPIRE', key, 62000) end
end

-- Milliseconds until `sum + add <= limit` in window `p`, as old buckets leave it.
-- Denials only, so reading every bucket here is fine.
local function wait_for(key, p, sum, add, limit)
  local all = redis.call('HGETALL', key)
  local buckets = {}
  for i = 1, #all, 2 do
    local name = all[i]
    local f = nil
    if p == '' then
      f = tonumber(name)
    elseif string.sub(name, 1, #p) == p then
      f = tonumber(string.sub(name, #p + 1))
    end
    if f then buckets[f] = tonumber(all[i + 1]) end
  end
  for k = 1, 61 do
    sum = sum - (buckets[oldest + k - 1] or 0)
    if sum + add <= limit then return (b + k) * 1000 - now end
  end
  return 61000
end

-- Milliseconds until the oldest counted bucket leaves the window (0 when empty).
local function reset_in(lo)
  if lo then return (lo + 61) * 1000 - now end
  return 0
end

-- At most this many expired leases of the key, and expired holds of each spend counter,
-- leave per decision. A backlog (a busy key without a concurrency limit, idle for longer
-- than its lease TTL, can have tens of thousands expire together) leaves over several
-- decisions instead of holding Redis for milliseconds in one.
local PURGE_BATCH = 100

-- A spend hold as its counter's :hx lists it.
local function hold_member(lease_token, amount) return lease_token .. ':' .. int(amount) end

-- The spend counter `key` (read: 'held' = held) without its expired holds: removes up
-- to PURGE_BATCH of them from :hx and their amounts from 'held'. Returns the new held
-- and the earliest expiry still listed (0: none), both written to the counter ('held',
-- 'nx'). Called only when 'nx' has passed (or is missing): no hold expires before it.
local function expire_holds(key, held)
  local hx = key .. ':hx'
  local first = redis.call('ZRANGE', hx, 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) <= now then
    local gone = redis.call('ZRANGEBYSCORE', hx, '-inf', int(now), 'LIMIT', 0, PURGE_BATCH)
    for _, m in ipairs(gone) do held = held - (tonumber(string.match(m, ':(%d+)$')) or 0) end
    if #gone > 0 then redis.call('ZREM', hx, unpack(gone)) end
    held = math.max(0, held)
    first = redis.call('ZRANGE', hx, 0, 0, 'WITHSCORES')
  end
  -- Nothing listed holds nothing (heals a 'held' that lost its members).
  if not first[2] then held = 0 end
  local nx = tonumber(first[2]) or 0
  redis.call('HSET', key, 'held', int(held), 'nx', int(nx))
  return held, nx
end

local req_used, req_lo, req_cur, tok_used, tok_lo, tok_cur = 0, nil, 0, 0, nil, 0
-- The client key's two windows, in one read.
if rpm_limit > 0 or tpm_limit > 0 then
  local h = redis.call('HMGET', WIN, 's', 'lo', bs, 'ts', 'tlo', 't' .. bs)
  if rpm_limit > 0 then req_used, req_lo, req_cur = settle_window(WIN, '', h, 1) end
  if tpm_limit > 0 then tok_used, tok_lo, tok_cur = settle_window(WIN, 't', h, 4) end
end
-- The first decision of this second on the key (no request taken in this second yet;
-- every decision when the key has neither window to tell): it purges expired leases and
-- extends the lease keys' expiry, which then covers every lease admitted in the second.
local new_second = (rpm_limit > 0 and req_cur == 0) or (rpm_limit == 0 and (tpm_limit == 0 or tok_cur == 0))

local in_flight, released = 0, 0
-- A light admission (ARGV 16) without a concurrency limit neither counts nor purges the
-- key's leases: nothing needs them (no balance hold), and its lease set, if any (leases
-- of other admissions of the key, renewed light ones), expires on its own or is purged
-- by the next decision that reads it.
if not light or conc_limit > 0 then
  -- Expired leases free their slot (and their reservation data), at most PURGE_BATCH per
  -- purge; meanwhile only live leases are counted (and renew.lua refuses expired ones).
  -- A key whose balance is tracked purges on every decision (an expired lease's hold
  -- must leave 'held' at once); any other key on the first decision of each second
  -- (new_second), which bounds its set as well and saves a call on the others: an
  -- expired lease not yet purged counts nowhere (in_flight counts live leases), its
  -- spend holds leave their counters by the counters' own purge, and its report settles
  -- it from ld as it would from lx.
  local scored = {}
  if bal_tracked or new_second then
    scored = redis.call('ZRANGEBYSCORE', LEASES, '-inf', int(now), 'WITHSCORES', 'LIMIT', 0, PURGE_BATCH)
  end
  local expired, expiries = {}, {}
  for i = 1, #scored, 2 do
    expired[#expired + 1] = scored[i]
    expiries[#expiries + 1] = tonumber(scored[i + 1])
  end
  if #expired > 0 then
    -- (Defined here: only a decision that purges makes these.)
    -- The fields of a lease's reservation data (7 in data written by an older release,
    -- 8 before quotas).
    local function fields(data)
      local f = {}
      for part in string.gmatch(data .. '|', '([^|]*)|') do f[#f + 1] = part end
      return f
    end

    -- A lease's quota corrections (its 9th field): {kind, counter key, amount} each.
    local function corrections(list)
      local out = {}
      for kind, key, amount in string.gmatch(list or '', '(%a%a),([^,;]+),(%d+)') do
        out[#out + 1] = {kind, key, tonumber(amount)}
      end
      return out
    end

    -- Releases one lease's hold from a spend counter, if it is still listed there (its
    -- report or the counter's purge may have released it already: never twice).
    local function release_hold(key, member, amount)
      if redis.call('ZREM', key .. ':hx', member) == 0 then return end
      local h = redis.call('HGET', key, 'held')
      if h then redis.call('HSET', key, 'held', int(math.max(0, tonumber(h) - amount))) end
    end
    -- Their holds leave the balance's held amount with them, and their spend holds the
    -- spend counters that still list them. Their data moves to lx until their duplicate
    -- guard lapses, so a late report still settles its own spend counters and model.
    local lx_until = 0
    for i, data in ipairs(redis.call('HMGET', LD, unpack(expired))) do
      if data then
        redis.call('HSET', LX, expired[i], data)
        redis.call('ZADD', LX .. ':e', int(expiries[i] + guard_ttl), expired[i])
        lx_until = math.max(lx_until, expiries[i] + guard_ttl)
        local f = fields(data)
        released = released + (tonumber(f[8] or '0') or 0)
        for _, c in ipairs(corrections(f[9])) do
          if string.sub(c[1], 1, 1) == 's' and c[3] > 0 then
            release_hold(c[2], hold_member(expired[i], c[3]), c[3])
          end
        end
      end
    end
    redis.call('ZREM', LEASES, unpack(expired))
    redis.call('HDEL', LD, unpack(expired))
    -- The hash lives until the latest guard of its leases lapses (+1 ms: a report at
    -- that very instant is still in time).
    if lx_until > 0 then
      local keep = lx_until - now + 1
      for _, k in ipairs({LX, LX .. ':e'}) do
        if redis.call('PTTL', k) < keep then redis.call('PEXPIRE', k, int(keep)) end
      end
    end
    -- Purged leases whose guard lapsed (no report can come now) leave lx, as many as
    -- may have come in (a lease's guard lapsing at this very instant still admits its
    -- report: only earlier ones leave). Only here: without purges, lx's expiry is not
    -- extended and it lapses whole, so a decision without one pays nothing for it.
    local lapsed = redis.call('ZRANGEBYSCORE', LX .. ':e', '-inf', '(' .. int(now), 'LIMIT', 0, PURGE_BATCH)
    if #lapsed > 0 then
      redis.call('HDEL', LX, unpack(lapsed))
      redis.call('ZREM', LX .. ':e', unpack(lapsed))
    end
  end
  if #expired == PURGE_BATCH or not (bal_tracked or new_second) then
    in_flight = redis.call('ZCOUNT', LEASES, '(' .. int(now), '+inf')
  else
    in_flight = redis.call('ZCARD', LEASES)
  end
end


local rem, held = -1, 0
if bal_tracked then
  -- (Read only here: a key without a balance pays nothing for them.)
  local credited, used, version = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
  assert(credited and used and version and math.abs(credited) <= MAX and math.abs(used) <= MAX, 'balance')
  local function bounded(x) return math.max(-MAX, math.min(MAX, x)) end
  local h = redis.call('HMGET', BAL, 'rem', 'cred', 'ver', 'held')
  if not h[1] then
    rem = bounded(credited - used)
    redis.call('HSET', BAL, 'rem', int(rem), 'cred', int(credited), 'ver', int(version))
  else
    rem = tonumber(h[1])
    assert(rem, 'live balance is not a number')
    -- An admin credit or debit the counters have not seen yet: apply its delta once.
    if tonumber(h[3]) < version then
      rem = bounded(rem + (credited - (tonumber(h[2]) or 0)))
      redis.call('HSET', BAL, 'rem', int(rem), 'cred', int(credited), 'ver', int(version))
    end
    held = tonumber(h[4]) or 0
  end
  -- Nothing in flight holds nothing (this also heals a held amount whose leases'
  -- data expired with their hash).
  local was = held
  held = math.max(0, held - released)
  if in_flight == 0 then held = 0 end
  if held ~= was then redis.call('HSET', BAL, 'held', int(held)) end
end

-- Quota entries: every counter is read before any check (and nothing is taken unless
-- all of them and everything else admit).
local DAY = 86400000
local MARGIN = 86400000 -- calendar counters outlive their period by this (late reports)
local today = math.floor(now / DAY)
-- The first day of the period `p` (d, w, m, t) holding today, and the first day after
-- it (nil for a total).
local function period(p)
  if p == 'd' then return today, today + 1 end
  if p == 'w' then
    local first = today - (today + 3) % 7 -- 1970-01-01 was a Thursday
    return first, first + 7
  end
  if p == 'm' then
    -- The integer steps of quota::days_from_civil / civil_from_days (H. Hinnant's),
    -- defined only for a month.
    local function idiv(x, y) return math.floor(x / y) end
    local function days_from_civil(y, m, d)
      if m <= 2 then y = y - 1 end
      local era = idiv(y, 400)
      local yoe = y - era * 400
      local doy = idiv(153 * ((m + 9) % 12) + 2, 5) + d - 1
      local doe = yoe * 365 + idiv(yoe, 4) - idiv(yoe, 100) + doy
      return era * 146097 + doe - 719468
    end
    local z = today + 719468
    local era = idiv(z, 146097)
    local doe = z - era * 146097
    local yoe = idiv(doe - idiv(doe, 1460) + idiv(doe, 36524) - idiv(doe, 146096), 365)
    local doy = doe - (365 * yoe + idiv(yoe, 4) - idiv(yoe, 100))
    local mp = idiv(5 * doy + 2, 153)
    local m = mp < 10 and mp + 3 or mp - 9
    local y = yoe + era * 400
    if m <= 2 then y = y + 1 end
    local first = days_from_civil(y, m, 1)
    if m == 12 then y, m = y + 1, 1 else m = m + 1 end
    return first, days_from_civil(y, m, 1)
  end
  return 0, nil
end

local quotas, q_index, q_exhausted = {}, 0, 0
for i = 1, nq do
  local at = 16 + 4 * (i - 1)
  local q = {kind = ARGV[at + 1], limit = tonumber(ARGV[at + 2])}
  assert(not light or q.kind == 'rm' or q.kind == 'rd', 'light quota')
  local seed_day, seed = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  assert(q.limit and q.limit >= 1 and q.limit <= MAX, 'quota limit')
  assert(seed_day and seed and seed >= 0 and seed <= MAX, 'quota seed')
  local base = KEYS[QK + i]
  if q.kind == 'rm' or q.kind == 'tm' then
    q.key = base .. ':' .. q.kind
    q.window = true
    q.used, q.lo, q.cur = window(q.key)
  elseif q.kind == 'rd' or q.kind == 'td' then
    q.key = base .. ':' .. q.kind .. ':' .. int(today)
    q.used = tonumber(redis.call('GET', q.key) or '0')
    assert(q.used, 'quota counter is not a number')
    -- Never below what the database had settled today (written only if admitted).
    if seed_day == today then q.used = math.max(q.used, seed) end
    q.ends = (today + 1) * DAY
  else
    local p = string.match(q.kind, '^s([dwmt])$')
    assert(p, 'quota kind')
    local first, after = period(p)
    q.key = base .. ':' .. q.kind .. ':' .. int(first)
    local h = redis.call('HMGET', q.key, 'spent', 'held', 'nx')
    q.spend = true
    q.spent = tonumber(h[1])
    if q.spent then
      -- Nothing held, nothing to expire (its holds sum to 'held'); and none expires
      -- before 'nx' (at or before the earliest hold's expiry: renewals only delay
      -- holds, and releases only remove them), so the holds are read only once it
      -- passed.
      q.held, q.nx = tonumber(h[2]) or 0, tonumber(h[3])
      if q.held > 0 and not (q.nx and q.nx > now) then q.held, q.nx = expire_holds(q.key, q.held) end
    else
      -- Missing (Redis lost it, or the period just began): no holds (any listed without
      -- their counter go).
      q.spent, q.held, q.created = 0, 0, true
      redis.call('DEL', q.key .. ':hx')
    end
    -- Never below what the database had settled in this period (written only if
    -- admitted).
    if seed_day == first then q.spent = math.max(q.spent, seed) end
    q.used = math.min(MAX, q.spent + q.held)
    q.ends = after and after * DAY
  end
  quotas[i] = q
end

local function answer(code, a)
  local out = {code, a, now, req_used, tok_used, reset_in(req_lo), reset_in(tok_lo), in_flight, rem,
               q_index, q_exhausted}
  for _, q in ipairs(quotas) do
    out[#out + 1] = q.used
    if q.window then
      out[#out + 1] = reset_in(q.lo)
    else
      out[#out + 1] = q.ends and (q.ends - now) or 0
    end
  end
  return out
end

-- Milliseconds until the first live lease expires (expired ones may still be in the set).
local function earliest_lease_expiry()
  local first = redis.call('ZRANGEBYSCORE', LEASES, '(' .. int(now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if first[2] then return math.max(tonumber(first[2]) - now, 1) end
  return 1000
end

if bal_tracked and rem <= 0 then return answer(4, 0) end
if rpm_limit > 0 and req_used + 1 > rpm_limit then
  return answer(1, wait_for(WIN, '', req_used, 1, rpm_limit))
end
if tpm_limit > 0 and tok_used + tokens > tpm_limit then
  return answer(2, wait_for(WIN, 't', tok_used, tokens, tpm_limit))
end
if conc_limit > 0 and in_flight >= conc_limit then return answer(3, earliest_lease_expiry()) end
-- Each request in flight holds its estimated cost; a request goes ahead only while the
-- balance less what is held covers its own hold. Its report replaces the hold by the real
-- cost, so the balance goes below zero only by what the requests in flight cost beyond
-- their holds (one request alone: its actual - hold).
if bal_tracked and rem - held < hold then
  if held > 0 then return answer(5, earliest_lease_expiry()) end
  return answer(4, 0)
end
local function refuse(i, exhausted, a)
  q_index, q_exhausted = i, exhausted
  return answer(8, a)
end
for i, q in ipairs(quotas) do
  local k = q.kind
  if k == 'rm' and q.used + 1 > q.limit then return refuse(i, 1, wait_for(q.key, '', q.used, 1, q.limit)) end
  if k == 'tm' and q.used + tokens > q.limit then
    return refuse(i, 1, wait_for(q.key, '', q.used, tokens, q.limit))
  end
  if (k == 'rd' and q.used + 1 > q.limit) or (k == 'td' and q.used + tokens > q.limit) then
    return refuse(i, 1, q.ends - now)
  end
  if q.spend then
    -- Spent, or too little left even once the requests in flight report: until the
    -- period ends (never for a total). Else held by requests in flight: soon.
    if q.spent >= q.limit or q.spent + hold > q.limit then
      return refuse(i, 1, q.ends and (q.ends - now) or 0)
    end
    if q.spent + q.held + hold > q.limit then return refuse(i, 0, 1000) end
  end
end

-- Admitted: take everything at once. The quota entries, and what the report (or the
-- lease's expiry) corrects: first the client's tokens, taken in the 't' window of
-- KEYS[1] ('kt').
local expiry = now + ttl
local corrected = {}
local taken, first = {}, false
if rpm_limit > 0 then
  take_fields(taken, '', 1, req_used, req_lo, req_cur)
  first = req_cur == 0
  req_used = req_used + 1
  req_lo = req_lo or b
end
if tpm_limit > 0 and tokens > 0 then
  take_fields(taken, 't', tokens, tok_used, tok_lo, tok_cur)
  first = first or tok_cur == 0
  tok_used = tok_used + tokens
  tok_lo = tok_lo or b
end
-- (With 0 tokens too: the report adds what was used to the second's count if it has one.
-- A light lease carries it in the signed lease instead.)
if tpm_limit > 0 and not light then corrected[1] = 'kt,' .. WIN .. ',' .. int(tokens) end
if #taken > 0 then take(WIN, taken, first) end
for _, q in ipairs(quotas) do
  local k = q.kind
  if q.window then
    local add = (k == 'rm') and 1 or tokens
    if add > 0 then
      local f = {}
      take_fields(f, '', add, q.used, q.lo, q.cur)
      take(q.key, f, q.cur == 0)
      q.used = q.used + add
      q.lo = q.lo or b
    end
    if k == 'tm' then corrected[#corrected + 1] = 'tm,' .. q.key .. ',' .. int(tokens) end
  elseif not q.spend then
    local add = (k == 'rd') and 1 or tokens
    -- q.used may be the seed; one SET writes the count and its expiry.
    redis.call('SET', q.key, int(q.used + add), 'PX', int(q.ends + MARGIN - now))
    q.used = q.used + add
    if k == 'td' then corrected[#corrected + 1] = 'td,' .. q.key .. ',' .. int(tokens) end
  else
    local first_hold = q.held == 0
    local nx = (not first_hold and q.nx) or 0
    if hold > 0 and (nx == 0 or expiry < nx) then nx = expiry end
    q.held = q.held + hold
    redis.call('HSET', q.key, 'spent', int(q.spent), 'held', int(q.held), 'nx', int(nx))
    if hold > 0 then redis.call('ZADD', q.key .. ':hx', int(expiry), hold_member(token, hold)) end
    if q.ends then
      -- The counter and its holds expire at one instant, fixed by the period: set when
      -- each is created (the counter here when it was missing; the holds' set when it
      -- held none, since an empty set does not exist), not on every decision.
      local at = int(q.ends + MARGIN - now)
      if q.created then redis.call('PEXPIRE', q.key, at) end
      if hold > 0 and first_hold then redis.call('PEXPIRE', q.key .. ':hx', at) end
    end
    q.used = math.min(MAX, q.spent + q.held)
    corrected[#corrected + 1] = k .. ',' .. q.key .. ',' .. int(hold)
  end
end

-- A light admission without a concurrency limit is done: no lease (its signed lease
-- carries its report's data), in_flight stays 0. With one, its slot is a member of the
-- lease set without a record.
if light and conc_limit == 0 then return answer(0, expiry) end
redis.call('ZADD', LEASES, int(expiry), token)
if not light then
  -- Reservation data for the report: second, client tokens in the release before's
  -- token window (0: they are in rpm's 't' window, listed with the corrections as 'kt'),
  -- provider|model|format, the picked provider key with its tokens (none: pick.lua's,
  -- the signed lease carries its pick), the balance hold and the quota corrections.
  redis.call('HSET', LD, token,
    bs .. '|0|' .. meta .. '||0|' .. int(bal_tracked and hold or 0) .. '|' .. table.concat(corrected, ';'))
  if bal_tracked and hold > 0 then redis.call('HSET', BAL, 'held', int(held + hold)) end
end
-- The lease keys outlive their newest lease by 1 s or more (renewals extend them too):
-- set to ttl + 3000 when no lease was live (the set may just have been made; nothing
-- later to keep, so never shortened), else on the second's first decision only, when
-- below ttl + 2000: so every lease admitted within the second (at most 1 s later, with
-- the same TTL, one setting of the deployment) is covered. On the others, only ld's PTTL
-- (below).
if in_flight == 0 or (new_second and redis.call('PTTL', LEASES) < ttl + 2000) then
  redis.call('PEXPIRE', LEASES, ttl + 3000)
  redis.call('PEXPIRE', LD, ttl + 3000)
elseif not light and redis.call('PTTL', LD) == -1 then
  -- ld was made just now by this record while leases without one (light ones) kept the
  -- set live: it takes the set's expiry, never less (a record outlives its lease).
  redis.call('PEXPIRE', LD, math.max(redis.call('PTTL', LEASES), ttl + 3000))
end
in_flight = in_flight + 1
return answer(0, expiry)
