-- pool_report.lua: a report's provider-key part, on the pool's hash tag: settle the
-- picked key's reserved tokens, and cool it down, suspend it, or keep what its
-- rate-limit headers said.
--
-- Sent together with report.lua (the client's part, on the lease's tenant shard), so a
-- report is one round trip of latency; and alone for a report without a lease that
-- names a key. Neither waits for the other's answer: this script decides alone, by its
-- own guard (KEYS 5) and the lease's signed expiry, that a lease's provider-key part
-- runs at most once, whatever report.lua answers:
--   - a repeat of the report (report.lua: duplicate) finds the guard, which lives until
--     the guard ttl after the lease's signed expiry (ARGV 15, 16), and changes nothing;
--   - a report later than the guard ttl after the signed expiry is refused (code 2:
--     nothing changed), as report.lua refuses it (too_late) unless a renewal moved the
--     lease's expiry: report.lua then records it, and its provider-key part is dropped
--     (the pick's reservation stays until its second leaves the window, which with the
--     default ttl it did long before; a cooldown or suspension it reports is lost);
--   - when report.lua fails (the caller retries) this part may have run already: the
--     retry's is then a duplicate. The upstream's answer did happen, so the cooldown it
--     caused and the tokens it used are kept even if the report is never retried.
--
-- Contract (checked against src/limits/scripts/pool_report.rs by
-- tests/script_contracts.rs):
--
-- KEYS (under the pool's hash tag):
--   1  pk_tpm               hash    the provider key's token window (admit.lua's)
--   2  pk_cd                string  when the provider key's cooldown ends (ms; the key
--                                   expires then too)
--   3  pk_susp              string  when its suspension ends (ms)
--   4  pk_cause             hash    'cd' / 'susp' -> "status|at ms|source": the report
--                                   behind the cooldown / suspension ("headers|status|at
--                                   ms|source" for a cooldown learned from rate-limit
--                                   headers); 'lim' -> "kept until ms|<ARGV 11>|at ms":
--                                   what the headers said last (the hash expires with
--                                   the latest of them)
--   5  guard                string  {tag}:prep:<lease token>: set by the first run of a
--                                   lease's report (ARGV 14) to when it lapses (ms): the
--                                   guard ttl after the later of now and the lease's
--                                   signed expiry; a repeat (the caller's, or a cluster
--                                   client re-sending a script whose reply a dropped
--                                   connection lost) then changes nothing
-- ARGV:
--   1  second               the second whose bucket took the pick's tokens (pick.lua's
--                           answer, carried by the lease); -1 = nothing to settle
--   2  reserved             the tokens it took (>= 0)
--   3  has_tokens           1 = the tokens below were reported, 0 = keep the reservation
--   4  used                 prompt + completion tokens
--   5  status               the upstream status ("" = unknown)
--   6  cooldown_ms          > 0 after an upstream 429
--   7  suspend_ms           > 0 after an upstream 401/403
--   8  cause_source         "lease <lease id>" or "data-token"; kept as the cause, cut to
--                           200 bytes
--   9  learned_cooldown_ms  > 0 when the upstream's rate-limit headers said a limit of
--                           the provider key is used up, and no error status stopped
--                           it; it only lengthens the key's cooldown
--   10 learned_keep_ms      how long to keep the learned limits (> 0 when 11 is given)
--   11 learned_limits       "" = none, or "remaining requests|remaining tokens|requests
--                           reset ms|tokens reset ms" (each "" when unknown)
--   12 time_shift_ms        added to the clock (0 in production)
--   13 now_ms               0 = the Redis server's TIME (production); else this instant
--   14 guarded              1 = a lease's report: run once (KEYS 5); 0 = without a lease
--   15 guard_ttl_ms         how long the guard outlives the lease's signed expiry (> 0;
--                           report.lua's ARGV 8)
--   16 lease_expiry         the expiry signed into the lease id (ms; 0 = no lease)
-- Returns {code, now_ms}; nothing changed unless the code is 1.
-- CODES:
--   0  duplicate            this lease's provider-key part ran already: nothing changed
--   1  settled
--   2  too_late             a lease's report later than the guard ttl after its signed
--                           expiry: nothing changed
--
-- The reservation is replaced by the actual count in the second where it was made (if
-- still in the window, and only when tokens were reported), as report.lua does for the
-- client's window.

local second, reserved = tonumber(ARGV[1]), tonumber(ARGV[2])
local has_tokens = ARGV[3] == '1'
local used = tonumber(ARGV[4])
local cooldown, suspend = tonumber(ARGV[6]), tonumber(ARGV[7])
local learned_cd, lim_keep, lim = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11] or ''
local shift, pinned = tonumber(ARGV[12]), tonumber(ARGV[13])
local MAX = 9007199254740991
local function whole(x) return x and x >= 0 and x <= MAX and x == math.floor(x) end
assert(second and whole(reserved) and whole(used), 'tokens')
assert(shift and pinned and whole(cooldown) and whole(suspend), 'times')
assert(whole(learned_cd) and whole(lim_keep) and #lim <= 200, 'learned limits')
assert(lim == '' or lim_keep > 0, 'learned limits keep')
local guarded, guard_ttl, expiry = ARGV[14] == '1', tonumber(ARGV[15]), tonumber(ARGV[16])
assert(whole(guard_ttl) and guard_ttl > 0 and whole(expiry), 'guard')

local now = pinned + shift
if pinned == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end
local b = math.floor(now / 1000)
local function int(x) return string.format('%d', x) end

if guarded then
  -- The guard holds the time it lapses, on the script clock (as report.lua's); "1" is a
  -- guard of the release before, live until its own expiry (2 minutes).
  local g = redis.call('GET', KEYS[5])
  if g == '1' or (tonumber(g) or 0) > now then return {0, now} end
  if expiry > 0 and now > expiry + guard_ttl then return {2, now} end
  -- Past its lapse a repeat is too late (above), so the guard never needs to outlive it.
  local lapses = math.max(now, expiry) + guard_ttl
  redis.call('SET', KEYS[5], int(lapses), 'PX', int(lapses - now))
end

if has_tokens and second >= b - 60 then
  local h = redis.call('HMGET', KEYS[1], second, 's')
  local old, sum = tonumber(h[1]), tonumber(h[2]) or 0
  if old then
    local new = math.max(0, old + used - reserved)
    redis.call('HSET', KEYS[1], second, int(new), 's', int(math.max(0, sum + new - old)))
  end
end

-- A learned cooldown only lengthens the current one.
local learned_until = nil
if learned_cd > 0 then
  local current = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
  if now + learned_cd > current then learned_until = now + learned_cd end
end
-- The end is a time on the script clock, compared with `now` by pick.lua; the expiry
-- only tidies up.
if cooldown > 0 then redis.call('SET', KEYS[2], now + cooldown, 'PX', cooldown) end
if suspend > 0 then redis.call('SET', KEYS[3], now + suspend, 'PX', suspend) end
if learned_until then redis.call('SET', KEYS[2], int(learned_until), 'PX', learned_cd) end
local keep = 0
if cooldown > 0 or suspend > 0 or learned_until then
  -- Who stopped the key, shown by pool_state.lua while the cooldown / suspension lasts.
  local cause = ARGV[5] .. '|' .. int(now) .. '|' .. string.sub(ARGV[8] or '', 1, 200)
  if cooldown > 0 then redis.call('HSET', KEYS[4], 'cd', cause) end
  if suspend > 0 then redis.call('HSET', KEYS[4], 'susp', cause) end
  if learned_until then redis.call('HSET', KEYS[4], 'cd', 'headers|' .. cause) end
  keep = math.max(cooldown, suspend, learned_until and learned_cd or 0)
end
if lim ~= '' then
  redis.call('HSET', KEYS[4], 'lim', int(now + lim_keep) .. '|' .. lim .. '|' .. int(now))
  keep = math.max(keep, lim_keep)
end
if keep > 0 then redis.call('PEXPIRE', KEYS[4], math.max(keep, redis.call('PTTL', KEYS[4]))) end
return {1, now}
