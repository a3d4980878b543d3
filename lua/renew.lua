-- renew.lua: extend a live lease, and its spend holds with it.
--
-- Contract (checked against src/limits/scripts/renew.rs by tests/script_contracts.rs):
--
-- KEYS (under the lease's tenant shard's hash tag):
--   1  leases         zset   lease token -> expiry (ms)
--   2  ld             hash   lease token -> reservation data; its 9th field lists the
--                            quota counters the lease holds spend on (see admit.lua),
--                            whose holds (<counter>:hx) take the new expiry too (and
--                            the counter's 'nx' the new expiry when that is earlier)
--   3  done           string the lease's report duplicate guard (report.lua's KEYS 5),
--                            read for a light lease only
-- ARGV:
--   1  lease_token
--   2  lease_ttl_ms   (> 0)
--   3  time_shift_ms  added to the clock (0 in production)
--   4  now_ms         0 = the Redis server's TIME (production); else this instant
--   5  light_expiry   0 = a lease with a record (in the lease set until its report or
--                     purge); else a light lease's signed expiry (ms; admit.lua's ARGV
--                     16 wrote no record): it is live until the later of that and its
--                     expiry in the lease set (a renewal's), unless reported (its
--                     guard is set); renewed, it is in the lease set with its new
--                     expiry (under a concurrency limit it is there from its
--                     admission: ZADD moves it), so a later renewal, its report (which
--                     removes it) and the purges treat it as any lease
-- Returns the new expiry (ms), or a code:
-- CODES:
--   -1 gone           the lease is unknown, reported or already expired (an expired
--                     lease has freed its slot; renewing it would take a slot unchecked)

local token = ARGV[1]
local ttl = tonumber(ARGV[2])
local shift = tonumber(ARGV[3])
local pinned = tonumber(ARGV[4])
local light_expiry = tonumber(ARGV[5])
assert(token and #token > 0, 'lease token')
assert(ttl and ttl > 0, 'lease ttl')
assert(shift and pinned and #ARGV == 5, 'time')
assert(light_expiry and light_expiry >= 0, 'light expiry')
local light = light_expiry > 0

local now = pinned + shift
if pinned == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end

local expiry = tonumber(redis.call('ZSCORE', KEYS[1], token))
if light then
  -- Not in the set unless renewed before; its guard tells a reported one (as
  -- report.lua: "1" is an older release's guard, live until its own expiry).
  local guard = tonumber(redis.call('GET', KEYS[3]) or '0')
  if guard == 1 or guard > now then return -1 end
  expiry = math.max(expiry or 0, light_expiry)
end
if not expiry or expiry <= now then return -1 end
local new_expiry = now + ttl
if light then
  redis.call('ZADD', KEYS[1], new_expiry, token)
else
  redis.call('ZADD', KEYS[1], 'XX', new_expiry, token)
end
-- The lease's spend holds expire with it (XX: a hold its counter no longer lists, the
-- counter being gone, stays gone). A light lease has none.
local data = not light and redis.call('HGET', KEYS[2], token)
if data then
  local f = {}
  for part in string.gmatch(data .. '|', '([^|]*)|') do f[#f + 1] = part end
  for kind, key, amount in string.gmatch(f[9] or '', '(%a%a),([^,;]+),(%d+)') do
    if string.sub(kind, 1, 1) == 's' and tonumber(amount) > 0 then
      local at = string.format('%d', new_expiry)
      if redis.call('ZADD', key .. ':hx', 'XX', 'CH', at, token .. ':' .. amount) == 1 then
        -- A renewal may shorten the hold: the counter's 'nx' (no hold expires before
        -- it, see admit.lua) must not stay later than the new expiry.
        local nx = tonumber(redis.call('HGET', key, 'nx'))
        if nx and new_expiry < nx then redis.call('HSET', key, 'nx', at) end
      end
    end
  end
end
if redis.call('PTTL', KEYS[1]) < ttl + 1000 then
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
  redis.call('PEXPIRE', KEYS[2], ttl + 1000)
end
return new_expiry
