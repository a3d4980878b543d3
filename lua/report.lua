-- report.lua: settle one finished request, exactly once, and queue it for the database
-- (the client's part, on the lease's tenant shard; the provider key's part is
-- pool_report.lua, on the pool's tag). In cancel mode (ARGV 20) it gives back an
-- admission whose pick was refused instead.
--
-- Contract (checked against src/limits/scripts/report.rs by tests/script_contracts.rs):
--
-- KEYS (under the lease's tenant shard's hash tag):
--   1  tpm                  hash    the client key's token window of the release before:
--                                   the tokens of a lease it admitted (ld's 2nd field);
--                                   a lease admit.lua admits now names the key's rpm hash
--                                   with its tokens instead ('kt' in ld's quotas, settled
--                                   in its 't' window)
--   2  leases               zset    lease token -> expiry (ms)
--   3  ld                   hash    lease token -> "bucket|reserved|provider|model|api_format|pk id|pk reserved|hold|quotas"
--                                   (see admit.lua; the quota counters it names are in
--                                   the same slot)
--   4  bal                  hash    live balance and the holds in flight (see admit.lua)
--   5  done                 string  when the duplicate guard of this lease id (or named
--                                   report, see ARGV 2) lapses (ms): it was reported
--   6  usage                stream  the accounting queue read by every replica's writer
--   7  lx                   hash    lease token -> the data of a lease admit.lua purged
--                                   after its expiry (as in ld; its slot and holds were
--                                   released then): read when ld has it no more (and
--                                   removed, with its entry in <lx>:e)
--   8  rpm                  hash    the client key's windows: its request window (cancel
--                                   mode), and a light lease's tokens ('t', ARGV 22)
-- KEYS per quota entry (1 each, after KEYS 8):
--   1  quota                the base name {tag}:q:<counter id> of a spend entry the
--                           request counts under now (see admit.lua): used only when the
--                           lease's data is in neither ld nor lx (Redis lost it); in
--                           cancel mode, of each rm and rd entry of the admission
-- ARGV:
--   1  lease_token          "" = a report without a lease: nothing to settle or
--                           deduplicate
--   2  record_id            the lease id, or the record id without a lease: a fresh
--                           one, or 'report:<name>' when its caller named it, which is
--                           then guarded by KEYS 5 for the guard ttl from now (a repeat
--                           answers duplicate)
--   3  key_id               the client key's id ("" = none)
--   4  has_tokens           1 = the tokens below were reported, 0 = keep the reservation
--   5  prompt               prompt tokens
--   6  completion           completion tokens
--   7  cost                 micro-USD (0..2^53-1)
--   8  guard_ttl_ms         how long the duplicate guard outlives the lease (> 0)
--   9  model                recorded when the lease's data names none (or without a
--                           lease); a lease admitted for a model records that one
--   10 provider_key         the provider key's id ("" = none), recorded
--   11 latency_ms           "" = unknown
--   12 status               the upstream status ("" = unknown)
--   13 time_shift_ms        added to the clock (0 in production)
--   14 lease_expiry         the expiry signed into the lease id (ms; 0 = no lease)
--   15 cached               cached input tokens (within prompt, >= 0)
--   16 cache_write          cache-write tokens (within prompt, >= 0)
--   17 reasoning            reasoning tokens (within completion, >= 0)
--   18 usage_source         where the numbers come from: "reported", "parsed" or
--                           "estimated"
--   19 now_ms               0 = the Redis server's TIME (production); else this instant
--   20 cancel               1 = give the admission back (its pick was refused): settle
--                           the lease with no tokens and no cost, take its request out
--                           of the key's and its rm entries' windows and its rd days,
--                           and queue no record; 0 = a report
--   21 requests             cancel mode: 1 = the key's rpm window took the request (it
--                           has an RPM limit), 0 = it did not
--   22 light                "" = the lease's data is in ld (or lx); else a light lease's
--                           (admit.lua's ARGV 16: no record was written), from its signed
--                           lease: "<second>|<kt>|provider|model|api_format", kt the
--                           client tokens reserved in the rpm hash's 't' window at that
--                           second ("" = none: no TPM limit). It settles as ld data
--                           "<second>|0|provider|model|api_format||0|0|kt,<rpm>,<kt>" would
--                           (never the lost-data path); under a concurrency limit its
--                           admission put it in the lease set (its slot), else a renewal
--                           may have (renew.lua): it leaves the set as any lease, once
-- ARGV per quota entry (1 each, from ARGV[23]):
--   1  kind                 sd sw sm st (spend per UTC day, ISO week, calendar month,
--                           total); rm rd in cancel mode
-- Returns {code, now_ms}; nothing changed unless the code is 1 (a cancel answers 1 too).
-- CODES:
--   0  duplicate            the lease was reported already
--   1  recorded
--   2  too_late             the report comes later than the guard ttl after the lease's
--                           expiry
--
-- The duplicate guard lives until the guard ttl after the lease's latest expiry (the
-- signed one, or a later one after renewals), and a report is refused after that: so a
-- lease can never be reported twice, however late the repeat.
--
-- Everything is read, checked and computed before the first write: Redis does not roll
-- a script back, so an error after the duplicate guard was set would lose the report
-- (its retry would answer "duplicate"). Every number stays within +-MAX (2^53 - 1, the
-- largest range of integers a Lua double holds exactly); the live balance is held
-- within it, as the in-process twin does.
--
-- In one step: the slot is released, token reservations (client's and provider key's)
-- are replaced by the actual count in the second where they were made (if still in the
-- window, and only when tokens were reported), the balance is debited and the lease's
-- hold released from what the balance holds in flight, the lease's quota counters are
-- corrected (per-minute and per-day tokens by actual - reserved, when tokens were
-- reported; each spend counter that still exists, in the period the request was
-- admitted in: spent += cost, and held -= hold only if the counter's :hx still lists
-- the hold, which then leaves it), the provider key is cooled down or suspended, and
-- the usage entry is appended to the stream. A hold leaves 'held' once: a report after
-- its lease expired and a purge released the hold (admit.lua's, of the counter or of
-- the key's leases) releases nothing, but still adds its cost to 'spent' when the
-- lease's data is still there. A lease that already expired is still recorded and
-- debited. A lease admit.lua purged after its expiry left its data in lx (KEYS 7) until
-- its guard lapses: its report settles with it as with ld (its own spend counters and
-- model entries, in the period it was admitted in; tm/td corrected), except what the
-- purge released (the slot, the balance hold, the spend holds). Only when its data is in
-- neither (Redis lost it) is its cost added to 'spent' of the current period of each
-- spend entry given (the ones the request counts under now), where that counter exists;
-- the duplicate guard makes this happen once. (Day token
-- counters are not corrected then: the next admission raises them to the database's
-- figure when the key's record reloads.)
--
-- A cancel is a report of nothing that also gives back the request: the lease's token
-- reservations leave their buckets (a bucket left empty goes, as if never taken), and
-- so do its request in the key's rpm window and in each rm window and rd day of the
-- admission's quota entries (named by the caller; the lease's data names only what a
-- report corrects). It sets the duplicate guard like a report, so it happens once and a
-- later report of the lease is a duplicate.

local token, lease_id, key_id = ARGV[1], ARGV[2], ARGV[3]
local has_tokens = ARGV[4] == '1'
local prompt = tonumber(ARGV[5])
local completion = tonumber(ARGV[6])
local cost = tonumber(ARGV[7])
local guard_ttl = tonumber(ARGV[8])
local pk = ARGV[10]
local shift = tonumber(ARGV[13])
local signed_expiry = tonumber(ARGV[14])
local cached, cache_write, reasoning = tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])
local source = ARGV[18]
local pinned = tonumber(ARGV[19])
local cancel = ARGV[20] == '1'
-- A report without a lease whose record id its caller named ('report:<name>'): guarded
-- by KEYS 5 as a lease's report is, for the guard ttl from now.
local named = token == '' and string.sub(lease_id, 1, 7) == 'report:'
local took_request = ARGV[21] == '1'
local light = ARGV[22]
local MAX = 9007199254740991 -- 2^53 - 1
local function whole(x) return x and x >= 0 and x <= MAX and x == math.floor(x) end
assert(#lease_id > 0, 'id')
assert(whole(prompt) and whole(completion), 'tokens')
assert(whole(cost), 'cost')
assert(guard_ttl and guard_ttl > 0, 'guard ttl')
assert(shift and pinned, 'times')
assert(whole(signed_expiry), 'lease expiry')
assert(whole(cached) and whole(cache_write) and whole(reasoning), 'token classes')
assert(source == 'reported' or source == 'parsed' or source == 'estimated', 'source')
assert(ARGV[20] == '0' or ARGV[20] == '1', 'cancel')
assert(not cancel or (has_tokens and prompt == 0 and completion == 0 and cost == 0), 'cancel')
local nk = 8
local nq = #ARGV - 22
assert(nq >= 0 and #KEYS == nk + nq, 'quota keys')
local late_kinds = {}
for i = 1, nq do
  if cancel then
    late_kinds[i] = string.match(ARGV[22 + i], '^r([md])$')
  else
    late_kinds[i] = string.match(ARGV[22 + i], '^s([dwmt])$')
  end
  assert(late_kinds[i], 'quota kind')
end

local now = pinned + shift
if pinned == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end
local b = math.floor(now / 1000)

-- A whole number as Redis stores it (Lua's own conversion keeps 14 digits: "1e+15").
local function int(x) return string.format('%.0f', x) end

-- The first day of the period `p` (d, w, m, t) holding now: admit.lua's steps (those of
-- src/quota.rs's days_from_civil / civil_from_days).
local DAY = 86400000
local function period_start(p)
  local today = math.floor(now / DAY)
  local function idiv(x, y) return math.floor(x / y) end
  if p == 'd' then return today end
  if p == 'w' then return today - (today + 3) % 7 end -- 1970-01-01 was a Thursday
  if p == 't' then return 0 end
  -- The month's first day: civil_from_days's day of the (March-based) year and month,
  -- less the days since that month began (days_from_civil's doy of day 1).
  local z = today + 719468
  local era = idiv(z, 146097)
  local doe = z - era * 146097
  local yoe = idiv(doe - idiv(doe, 1460) + idiv(doe, 36524) - idiv(doe, 146096), 365)
  local doy = doe - (365 * yoe + idiv(yoe, 4) - idiv(yoe, 100))
  local mp = idiv(5 * doy + 2, 153)
  return today - doy + idiv(153 * mp + 2, 5)
end

-- Reads only: what settling `reserved` tokens taken at second `bucket` writes (the
-- bucket's and the sum's new values), or nil when there is nothing to settle. `p` is
-- the window's field prefix in its hash ('' or nil: a window of its own; 't': the client
-- key's tokens, beside its requests, see admit.lua).
local function settle(key, bucket, reserved, p)
  if not (has_tokens and reserved and bucket and bucket >= b - 60) then return nil end
  p = p or ''
  local h = redis.call('HMGET', key, p .. bucket, p .. 's')
  local old, sum = tonumber(h[1]), tonumber(h[2]) or 0
  if not old then return nil end
  local new = math.max(0, old + prompt + completion - reserved)
  return {key, p .. bucket, new, p .. 's', math.max(0, sum + new - old)}
end

-- Reads only (cancel mode): what taking `amount` back out of `key`'s bucket `bucket`
-- of the window with field prefix `p` (as settle()) writes: {key, bucket field, new
-- value or false (the bucket goes), sum field, sum, lo field, lo (false: the window's
-- fields go)}, or nil when the window counts it no more.
local function untake(key, bucket, amount, p)
  if not (bucket and amount and amount > 0 and bucket >= b - 60) then return nil end
  p = p or ''
  local h = redis.call('HMGET', key, p .. bucket, p .. 's', p .. 'lo')
  local cur, sum, lo = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3])
  if not cur then return nil end
  local new = math.max(0, cur - amount)
  sum = math.max(0, sum - (cur - new))
  if new > 0 then return {key, p .. bucket, new, p .. 's', sum, p .. 'lo', lo or true} end
  if lo == bucket then
    lo = bucket + 1
    while lo <= b and redis.call('HEXISTS', key, p .. lo) == 0 do lo = lo + 1 end
    if lo > b then lo = false end
  end
  return {key, p .. bucket, false, p .. 's', sum, p .. 'lo', lo}
end

-- Reads only: a day counter's correction by actual - reserved ({key, delta}), or nil.
local function settle_day(key, reserved)
  if not has_tokens then return nil end
  local old = tonumber(redis.call('GET', key) or '')
  if not old then return nil end
  return {key, math.max(0, old + prompt + completion - reserved) - old}
end

-- Reads only: a spend counter's new 'spent' and 'held', and the lease's hold to remove
-- from its :hx (false when not listed: released already, or none), or nil when the
-- counter is gone.
local function settle_spend(key, hold_q)
  local h = redis.call('HMGET', key, 'spent', 'held')
  local spent = tonumber(h[1])
  if not spent then return nil end
  local held, member = tonumber(h[2]) or 0, false
  if hold_q > 0 then
    member = token .. ':' .. int(hold_q)
    if redis.call('ZSCORE', key .. ':hx', member) then
      held = math.max(0, held - hold_q)
    else
      member = false
    end
  end
  return {key, math.min(MAX, spent + cost), held, member}
end

local provider, model, api_format = '', ARGV[9], ''
local held, purged, settles, bal, lapses, hold = false, false, {}, nil, nil, 0
local days, spends, late, untakes = {}, {}, {}, {}
if token ~= '' then
  local expiry = math.max(signed_expiry, tonumber(redis.call('ZSCORE', KEYS[2], token) or '0'))
  -- The guard holds the time it lapses, on the script clock; "1" is a guard written by
  -- an older release, live until its own expiry.
  local guard = tonumber(redis.call('GET', KEYS[5]) or '0')
  if guard == 1 or guard > now then return {0, now} end
  if signed_expiry > 0 and now > expiry + guard_ttl then return {2, now} end
  lapses = math.max(now, expiry) + guard_ttl
  local data
  if light ~= '' then
    -- A light lease: its data as ld would hold it (its tokens named in the rpm hash).
    local second, kt, meta = string.match(light, '^(%d+)|(%d*)|(.*)$')
    assert(second and token ~= '', 'light lease')
    data = second .. '|0|' .. meta .. '||0|0|' .. (kt ~= '' and ('kt,' .. KEYS[8] .. ',' .. kt) or '')
  else
    data = redis.call('HGET', KEYS[3], token)
  end
  if not data then
    -- Purged after its expiry (admit.lua): its slot and holds are released already.
    data = redis.call('HGET', KEYS[7], token)
    purged = data and true or false
  end
  if data then
    held = true
    local f = {}
    for part in string.gmatch(data .. '|', '([^|]*)|') do f[#f + 1] = part end
    local bucket = tonumber(f[1])
    provider, api_format = f[3] or '', f[5] or ''
    -- The model the lease was admitted for (its allow-list and per-model limits were
    -- checked against it) is the one recorded: the report's names it only when the
    -- admission named none.
    if (f[4] or '') ~= '' then model = f[4] end
    redis.call('ZSCORE', KEYS[2], token) -- only to fail here, not later, on a wrong type
    if cancel then
      untakes[#untakes + 1] = untake(KEYS[1], bucket, tonumber(f[2]))
      if took_request then untakes[#untakes + 1] = untake(KEYS[8], bucket, 1) end
      for i = 1, nq do
        if late_kinds[i] == 'm' then
          untakes[#untakes + 1] = untake(KEYS[nk + i] .. ':rm', bucket, 1)
        else
          days[#days + 1] = settle_day(KEYS[nk + i] .. ':rd:' .. int(math.floor(bucket * 1000 / DAY)), 1)
        end
      end
    else
      settles[#settles + 1] = settle(KEYS[1], bucket, tonumber(f[2]))
    end
    if not purged then hold = tonumber(f[8] or '0') or 0 end
    for kind, key, amount in string.gmatch(f[9] or '', '(%a%a),([^,;]+),(%d+)') do
      amount = tonumber(amount)
      if kind == 'kt' and cancel then
        untakes[#untakes + 1] = untake(key, bucket, amount, 't')
      elseif kind == 'kt' then
        settles[#settles + 1] = settle(key, bucket, amount, 't')
      elseif kind == 'tm' and cancel then
        untakes[#untakes + 1] = untake(key, bucket, amount)
      elseif kind == 'tm' then
        settles[#settles + 1] = settle(key, bucket, amount)
      elseif kind == 'td' then
        days[#days + 1] = settle_day(key, amount)
      elseif string.sub(kind, 1, 1) == 's' then
        spends[#spends + 1] = settle_spend(key, amount)
      end
    end
  elseif not cancel then
    -- Its data is lost (Redis lost it): the cost counts in the spend counters of now
    -- that exist.
    for i = 1, nq do
      local key = KEYS[nk + i] .. ':s' .. late_kinds[i] .. ':' .. int(period_start(late_kinds[i]))
      local spent = tonumber(redis.call('HGET', key, 'spent') or '')
      if spent then late[#late + 1] = {key, math.min(MAX, spent + cost)} end
    end
  end
  local h = redis.call('HMGET', KEYS[4], 'rem', 'held')
  if h[1] then
    local rem = tonumber(h[1])
    assert(rem, 'live balance is not a number')
    -- Only a lease still in flight holds anything (an expired one's hold was released
    -- when admit.lua removed it).
    bal = {math.max(-MAX, math.min(MAX, rem - cost)), math.max(0, (tonumber(h[2]) or 0) - hold)}
  end
elseif named then
  -- A report without a lease that its caller named: its repeats are duplicates.
  if tonumber(redis.call('GET', KEYS[5]) or '0') > now then return {0, now} end
end
-- The queue must take the entry: a key of another type would fail the XADD below.
local kind = redis.call('TYPE', KEYS[6])
kind = type(kind) == 'table' and kind.ok or kind
assert(kind == 'none' or kind == 'stream', 'usage stream')

-- Nothing can fail from here on: write.
if named then redis.call('SET', KEYS[5], int(now + guard_ttl), 'PX', int(guard_ttl)) end
if token ~= '' then
  redis.call('SET', KEYS[5], int(lapses), 'PX', int(lapses - now))
  if purged then
    redis.call('HDEL', KEYS[7], token)
    redis.call('ZREM', KEYS[7] .. ':e', token)
  elseif held then
    if light == '' then redis.call('HDEL', KEYS[3], token) end
    redis.call('ZREM', KEYS[2], token)
  end
  for _, s in ipairs(settles) do redis.call('HSET', s[1], s[2], int(s[3]), s[4], int(s[5])) end
  -- A window whose last bucket goes loses its fields (the hash goes with its last field;
  -- the client key's hash keeps its other window).
  for _, u in ipairs(untakes) do
    if not u[7] then
      redis.call('HDEL', u[1], u[2], u[4], u[6])
    elseif u[3] then
      redis.call('HSET', u[1], u[2], int(u[3]), u[4], int(u[5]))
    else
      redis.call('HDEL', u[1], u[2])
      redis.call('HSET', u[1], u[4], int(u[5]), u[6], u[7])
    end
  end
  if bal then redis.call('HSET', KEYS[4], 'rem', int(bal[1]), 'held', int(bal[2])) end
  -- INCRBY and HSET keep each counter's expiry.
  for _, d in ipairs(days) do
    if d[2] ~= 0 then redis.call('INCRBY', d[1], int(d[2])) end
  end
  for _, sp in ipairs(spends) do
    redis.call('HSET', sp[1], 'spent', int(sp[2]), 'held', int(sp[3]))
    if sp[4] then redis.call('ZREM', sp[1] .. ':hx', sp[4]) end
  end
  for _, l in ipairs(late) do redis.call('HSET', l[1], 'spent', int(l[2])) end
end

if cancel then return {1, now} end
redis.call('XADD', KEYS[6], '*',
  'id', lease_id, 'key', key_id, 'provider', provider, 'model', model, 'fmt', api_format,
  'pk', pk, 'pt', int(prompt), 'ct', int(completion), 'cost', int(cost),
  'lat', ARGV[11], 'st', ARGV[12], 'ts', int(now),
  'cr', int(cached), 'cw', int(cache_write), 'rs', int(reasoning), 'src', source)
return {1, now}
