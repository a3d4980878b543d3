-- pool_sync.lua: (re)write a provider pool's definition and pick order in Redis.
--
-- Run when admit.lua answers that its pool version is not the one the caller holds
-- (an admin change, or the first pick from this pool).
--
-- KEYS (under the deployment's hash tag):
--   1  def    hash  '_v' -> version; provider key id -> "max_rpm|max_tpm" (0 = unlimited)
--   2  order  zset  provider key id -> priority rank * 2^42 + last pick (ms)
-- ARGV:
--   1  version
--   then per provider key (5 each, from ARGV[2]): id, max rpm, max tpm, priority rank
--      (0 = the lowest priority value), index in the caller's list
-- Returns 1.
--
-- A key never picked scores its index instead of a time (indexes stay below 2^20, far
-- below any time), so ties keep the caller's order. Pick times of keys that stay in the
-- pool are kept; keys that left the pool leave the order.

local SHIFT = 4398046511104 -- 2^42 ms, about year 2109; rank * SHIFT + time stays below 2^53
local version = ARGV[1]
assert(version and #version > 0, 'version')
assert((#ARGV - 1) % 5 == 0, 'candidates')

local last = {}
local current = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #current, 2 do last[current[i]] = tonumber(current[i + 1]) % SHIFT end

redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], '_v', version)
for a = 2, #ARGV, 5 do
  local id, rank, index = ARGV[a], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  assert(#id > 0 and rank and rank >= 0 and rank < 2048 and index and index < 1048576, 'candidate')
  redis.call('HSET', KEYS[1], id, ARGV[a + 1] .. '|' .. ARGV[a + 2])
  local picked = last[id]
  if not picked or picked < 1048576 then picked = index end
  redis.call('ZADD', KEYS[2], rank * SHIFT + picked, id)
end
redis.call('PEXPIRE', KEYS[1], 86400000)
redis.call('PEXPIRE', KEYS[2], 86400000)
return 1
