-- renew.lua: extend a live lease.
--
-- KEYS (under the deployment's hash tag):
--   1  leases  zset   lease token -> expiry (ms)
--   2  ld      hash   lease token -> reservation data
-- ARGV:
--   1  lease token    2  lease ttl ms (> 0)    3  time shift ms (0 in production)
-- Returns the new expiry (ms), or -1 when the lease is unknown or already expired
-- (an expired lease has freed its slot; renewing it would take a slot unchecked).

local token = ARGV[1]
local ttl = tonumber(ARGV[2])
local shift = tonumber(ARGV[3])
assert(token and #token > 0, 'lease token')
assert(ttl and ttl > 0, 'lease ttl')
assert(shift, 'time shift')

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift

local expiry = tonumber(redis.call('ZSCORE', KEYS[1], token))
if not expiry or expiry <= now then return -1 end
local new_expiry = now + ttl
redis.call('ZADD', KEYS[1], 'XX', new_expiry, token)
if redis.call('PTTL', KEYS[1]) < ttl + 1000 then
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
  redis.call('PEXPIRE', KEYS[2], ttl + 1000)
end
return new_expiry
