-- admit_window.lua: decide one light admission of a client key whose only limits are its
-- windows (RPM and/or TPM): no concurrency limit, no tracked balance, no quota entry, so
-- no lease record (its signed lease carries what its report settles). The common key's
-- path, kept apart from lua/admit.lua so it reads six arguments and defines no function:
-- its cost is the reference's (benches/reference.lua) plus the second window.
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
-- ARGV (a limit of 0 means no limit):
--   1  rpm_limit          requests per minute (0 = unlimited)
--   2  tpm_limit          tokens per minute (0 = unlimited)
--   3  tokens             tokens to reserve (>= 0)
--   4  lease_ttl_ms       (> 0): the answer's lease expiry is now + this
--   5  time_shift_ms      added to the clock (0 in production)
--   6  now_ms             0 = the Redis server's TIME (production); else this instant
-- Returns lua/admit.lua's reply without quota entries: {code, a, now_ms, req_used,
--          tok_used, req_reset_ms, tok_reset_ms, in_flight (0), bal_rem (-1),
--          quota_index (0), quota_exhausted (0)}
-- CODES:
--   0  admitted           a = lease expiry ms
--   1  requests           requests window full; a = retry ms
--   2  tokens             tokens window full; a = retry ms
--
-- Same windows, settling, expiry and retry times as lua/admit.lua (see its header): an
-- admission at second b counts buckets b-60..b; the hash lives 62 s from a second's first
-- take. Three calls on the common path (TIME, one HMGET, one HSET), a PEXPIRE on a
-- second's first take, and about once a second the removal of the seconds that left.
-- The parts used only then, or on a denial, are written inline in their branch: a Lua
-- function is a closure made on every call.

local rpm_limit = tonumber(ARGV[1])
local tpm_limit = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local shift = tonumber(ARGV[5])
local pinned = tonumber(ARGV[6])
-- One assert for all: every amount within 2^53 - 1, where a Lua double is exact.
assert(#KEYS == 1 and #ARGV == 6 and rpm_limit and rpm_limit >= 0 and tpm_limit and tpm_limit >= 0
  and tokens and tokens >= 0 and tokens <= 9007199254740991 and ttl and ttl > 0 and shift and pinned,
  'arguments')
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
  return {code, wait, now, req_used, tok_used, req_reset, tok_reset, 0, -1, 0, 0}
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
return {0, now + ttl, now, req_used, tok_used, req_reset, tok_reset, 0, -1, 0, 0}
