-- pool_state.lua: the live state of provider keys, for the admin API. Reads only.
--
-- Contract (checked against src/limits/scripts/pool_state.rs by
-- tests/script_contracts.rs):
--
-- KEYS per provider key (under the pool's hash tag; 5 each, repeated):
--   1  rpm            hash    its requests window (see admit.lua)
--   2  tpm            hash    its tokens window
--   3  cd             string  when its cooldown ends (ms)
--   4  susp           string  when its suspension ends (ms)
--   5  cause          hash    what stopped it (see report.lua)
-- ARGV:
--   1  time_shift_ms  added to the clock (0 in production)
--   2  now_ms         0 = the Redis server's TIME (production); else this instant
-- Returns per key (7 each): requests in the window, tokens in the window, cooldown left
-- (ms), suspension left (ms), the cooldown's cause and the suspension's cause
-- ("status|at ms|source", or "" when there is none or it is over), and what the
-- rate-limit headers said last ("kept until ms|...|at ms", or "" when none is kept).

local shift = tonumber(ARGV[1])
local pinned = tonumber(ARGV[2])
assert(shift and pinned and #ARGV == 2 and #KEYS % 5 == 0, 'arguments')
local now = pinned + shift
if pinned == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
end
local oldest = math.floor(now / 1000) - 60

local function counted(key)
  local all = redis.call('HGETALL', key)
  local sum = 0
  for i = 1, #all, 2 do
    local f = tonumber(all[i])
    if f and f >= oldest then sum = sum + tonumber(all[i + 1]) end
  end
  return sum
end

local out = {}
for i = 1, #KEYS, 5 do
  local cooling = math.max(0, tonumber(redis.call('GET', KEYS[i + 2]) or '0') - now)
  local suspended = math.max(0, tonumber(redis.call('GET', KEYS[i + 3]) or '0') - now)
  local cause = redis.call('HMGET', KEYS[i + 4], 'cd', 'susp', 'lim')
  local lim_until = tonumber(string.match(cause[3] or '', '^(%d+)|') or '0')
  out[#out + 1] = counted(KEYS[i])
  out[#out + 1] = counted(KEYS[i + 1])
  out[#out + 1] = cooling
  out[#out + 1] = suspended
  out[#out + 1] = cooling > 0 and cause[1] or ''
  out[#out + 1] = suspended > 0 and cause[2] or ''
  out[#out + 1] = lim_until > now and cause[3] or ''
end
return out
