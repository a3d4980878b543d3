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
-- ARGV:
--   1  lease_token
--   2  lease_ttl_ms   (> 0)
--   3  time_shift_ms  added to the clock (0 in production)
--   4  now_ms         0 = the Redis server's TIME (production); else this instant
-- Returns the new expiry (ms), or a code:
-- CODES:
--   -1 gone           the lease is unknown or already expired (an expired lease has
--                     freed its slot; renewing it would take a slot unchecked)

local token = ARGV[1]
local ttl = tonumber(ARGV[2])
local shift = tonumber(ARGV[3])
local pinned = tonumber(ARGV[4])
assert(token and #token > 0, 'lease token')
assert(ttl and ttl > 0, 'lease ttl')
assert(shift and pinned and #ARGV == 4, 'time')

local now = pinned + shift
if pinned == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end

local expiry = tonumber(redis.call('ZSCORE', KEYS[1], token))
if not expiry or expiry <= now then return -1 end
local new_expiry = now + ttl
redis.call('ZADD', KEYS[1], 'XX', new_expiry, token)
-- The lease's spend holds expire with it (XX: a hold its counter no longer lists, the
-- counter being gone, stays gone).
local data = redis.call('HGET', KEYS[2], token)
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
