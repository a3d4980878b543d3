-- quota_read.lua: the live figures of quota counters and of a key's own minute windows,
-- for the admin quota views. Reads only: nothing is written, pruned or purged (an
-- expired hold or a second that left a window is skipped, not removed).
--
-- Contract (checked against src/limits/scripts/quota_read.rs by
-- tests/script_contracts.rs):
--
-- KEYS per quota entry (1 each, repeated; all under one tenant shard's hash tag):
--   1  counter        kinds rm..st: the entry's base name {tag}:q:<counter id>, as
--                     admit.lua takes it (the counters are named from it the same way);
--                     kinds kw, kt: a client key's own windows' hash ({tag}:k:<id>:rpm,
--                     see admit.lua)
-- ARGV:
--   1  time_shift_ms  added to the clock (0 in production)
--   2  now_ms         0 = the Redis server's TIME (production); else this instant
-- ARGV per quota entry (3 each, from ARGV[3]):
--   1  kind           rm tm rd td sd sw sm st (see admit.lua), or a key's own window:
--                     kw its requests, kt its tokens (the fields prefixed 't')
--   2  seed_day       day counts and spend: the start day of the seed below (-1 = none)
--   3  seed_micros    the database's figure (a count, or micro-USD): when seed_day is the
--                     current period's start, a counter reads as the larger of itself
--                     (0 when missing) and this, as the next admission would take it
-- Returns {now_ms, then per entry: used, held, reset_ms}: used is the requests or tokens
-- in the window (seconds b-60..b), the UTC day's count, or a spend period's 'spent';
-- held is the sum of the spend holds listed in its :hx whose lease expires after now (0
-- for the other kinds); reset_ms is the time until the window's oldest counted second
-- leaves it (0 when empty) or until the period ends (0 for a total).

local shift = tonumber(ARGV[1])
local pinned = tonumber(ARGV[2])
assert(shift and pinned and #ARGV == 2 + 3 * #KEYS, 'arguments')
local now = pinned + shift
if pinned == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end
local b = math.floor(now / 1000)
local oldest = b - 60
local DAY = 86400000
local today = math.floor(now / DAY)

-- The integer steps of quota::days_from_civil / civil_from_days (as admit.lua).
local function idiv(x, y) return math.floor(x / y) end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = idiv(y, 400)
  local yoe = y - era * 400
  local doy = idiv(153 * ((m + 9) % 12) + 2, 5) + d - 1
  local doe = yoe * 365 + idiv(yoe, 4) - idiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = idiv(z, 146097)
  local doe = z - era * 146097
  local yoe = idiv(doe - idiv(doe, 1460) + idiv(doe, 36524) - idiv(doe, 146096), 365)
  local doy = doe - (365 * yoe + idiv(yoe, 4) - idiv(yoe, 100))
  local mp = idiv(5 * doy + 2, 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
-- The first day of the period `p` (d, w, m, t) holding today, and the first day after
-- it (nil for a total).
local function period(p)
  if p == 'd' then return today, today + 1 end
  if p == 'w' then
    local first = today - (today + 3) % 7 -- 1970-01-01 was a Thursday
    return first, first + 7
  end
  if p == 'm' then
    local y, m = civil_from_days(today)
    local first = days_from_civil(y, m, 1)
    if m == 12 then y, m = y + 1, 1 else m = m + 1 end
    return first, days_from_civil(y, m, 1)
  end
  return 0, nil
end

-- A window's sum over the seconds still in it, and the time until its oldest such
-- second leaves (0 when none): what admit.lua's window() would find, without pruning.
-- `p` is the prefix of its fields ('' or 't', see admit.lua).
local function window(key, p)
  local all = redis.call('HGETALL', key)
  local sum, lo = 0, nil
  for i = 1, #all, 2 do
    local f = nil -- 's', 'lo' and the other window's fields are not its seconds
    if p == '' then
      f = tonumber(all[i])
    elseif string.sub(all[i], 1, 1) == p then
      f = tonumber(string.sub(all[i], 2))
    end
    if f and f >= oldest then
      sum = sum + tonumber(all[i + 1])
      if not lo or f < lo then lo = f end
    end
  end
  return sum, lo and ((lo + 61) * 1000 - now) or 0
end

local out = {now}
for i = 1, #KEYS do
  local at = 2 + 3 * (i - 1)
  local kind = ARGV[at + 1]
  local seed_day, seed = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  assert(seed_day and seed and seed >= 0, 'quota seed')
  local base = KEYS[i]
  local used, held, reset = 0, 0, 0
  if kind == 'kw' then
    used, reset = window(base, '')
  elseif kind == 'kt' then
    used, reset = window(base, 't')
  elseif kind == 'rm' or kind == 'tm' then
    used, reset = window(base .. ':' .. kind, '')
  elseif kind == 'rd' or kind == 'td' then
    used = tonumber(redis.call('GET', base .. ':' .. kind .. ':' .. string.format('%.0f', today)) or '0') or 0
    if seed_day == today then used = math.max(used, seed) end
    reset = (today + 1) * DAY - now
  else
    local p = string.match(kind or '', '^s([dwmt])$')
    assert(p, 'quota kind')
    local first, after = period(p)
    local key = base .. ':' .. kind .. ':' .. string.format('%.0f', first)
    local spent = tonumber(redis.call('HGET', key, 'spent') or '')
    if spent then
      used = spent
      if seed_day == first then used = math.max(used, seed) end
      -- The live holds only: an expired one still listed is no longer held (the next
      -- decision reading the counter drops it).
      local live = redis.call('ZRANGEBYSCORE', key .. ':hx', '(' .. string.format('%.0f', now), '+inf')
      for _, m in ipairs(live) do held = held + (tonumber(string.match(m, ':(%d+)$')) or 0) end
    else
      used = (seed_day == first) and seed or 0
    end
    reset = after and (after * DAY - now) or 0
  end
  out[#out + 1] = used
  out[#out + 1] = held
  out[#out + 1] = reset
end
return out
