-- pool_sync.lua: (re)write a provider pool's definition and pick order in Redis.
--
-- Run when pick.lua answers that its pool version is not the one the caller holds
-- (an admin change, or the first pick from this pool).
--
-- Contract (checked against src/limits/scripts/pool_sync.rs by
-- tests/script_contracts.rs):
--
-- KEYS (under the pool's hash tag):
--   1  def       hash  '_v' -> version, '_t' -> its stamp (when the writer loaded it,
--                      ms); provider key id -> "max_rpm|max_tpm" (0 = unlimited)
--   2  order     zset  provider key id -> priority rank * 2^42 + last pick (ms)
-- ARGV:
--   1  version
--   2  stamp     (> 0)
-- ARGV per provider key (5 each, repeated from ARGV[3]):
--   1  id
--   2  max_rpm   (0 = unlimited)
--   3  max_tpm   (0 = unlimited)
--   4  rank      priority rank (0 = the lowest priority value)
--   5  index     its index in the caller's list
-- Returns 0, or the stamp of the pool Redis holds when that is later than the caller's:
-- CODES:
--   0  in_sync   Redis holds this version (written now or already)
-- When the stamp is returned nothing is written, and the caller reloads its pool from
-- the database instead. So a replica holding an outdated pool (it missed an
-- invalidation) never writes it over a newer one.
--
-- A key never picked scores its index * 2^9 instead of a time (below 2^29 ms, far
-- below any time; the factor keeps indexes exact at every rank, see below), so ties
-- keep the caller's order. Pick times of keys that stay in the
-- pool are kept; keys that left the pool leave the order.
--
-- Scores are doubles: rank * 2^42 + time is exact below rank 2^11. Above that (a pool
-- with more than 2,048 distinct priorities, which the admin API allows) the time part
-- is rounded to 2^(bits above 53) ms (2 ms at rank 2,048, about 0.5 s at rank 10^6);
-- the rank part stays exact (the rounding is far smaller than 2^42), so priority order
-- always holds and least-recently-picked order within a priority holds to that grain.
--
-- Writes go in chunks of CHUNK keys (one HSET and one ZADD each), so neither a command
-- nor unpack() gets an argument list as long as the pool.

local SHIFT = 4398046511104 -- 2^42 ms, about year 2109: the time part of a score
local MAX_KEYS = 1048576     -- 2^20: indexes and ranks stay below it
local NEVER = 512            -- 2^9: a never-picked key scores index * NEVER
local CHUNK = 500
local version = ARGV[1]
local stamp = tonumber(ARGV[2])
assert(version and #version > 0, 'version')
assert(stamp and stamp > 0, 'stamp')
assert((#ARGV - 2) % 5 == 0, 'candidates')

-- Validate everything before the first write.
for a = 3, #ARGV, 5 do
  local rank, index = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  assert(#ARGV[a] > 0 and rank and rank >= 0 and rank < MAX_KEYS and index and index >= 0
    and index < MAX_KEYS, 'candidate')
end

local held = redis.call('HMGET', KEYS[1], '_v', '_t')
if held[1] == version then return 0 end
local held_stamp = tonumber(held[2])
if held_stamp and held_stamp > stamp then return held_stamp end

local last = {}
local current = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #current, 2 do last[current[i]] = tonumber(current[i + 1]) % SHIFT end

redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], '_v', version, '_t', ARGV[2])
local def, order = {}, {}
local function flush()
  if #def > 0 then redis.call('HSET', KEYS[1], unpack(def)) end
  if #order > 0 then redis.call('ZADD', KEYS[2], unpack(order)) end
  def, order = {}, {}
end
for a = 3, #ARGV, 5 do
  local id, rank, index = ARGV[a], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local picked = last[id]
  if not picked or picked < MAX_KEYS * NEVER then picked = index * NEVER end
  def[#def + 1] = id
  def[#def + 1] = ARGV[a + 1] .. '|' .. ARGV[a + 2]
  order[#order + 1] = string.format('%.17g', rank * SHIFT + picked)
  order[#order + 1] = id
  if #order >= 2 * CHUNK then flush() end
end
flush()
redis.call('PEXPIRE', KEYS[1], 86400000)
redis.call('PEXPIRE', KEYS[2], 86400000)
return 0
