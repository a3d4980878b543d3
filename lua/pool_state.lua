-- pool_state.lua: the live state of provider keys, for the admin API. Reads only.
--
-- KEYS (under the deployment's hash tag): per provider key (4 each): rpm hash, tpm hash,
--   cd string, susp string (see admit.lua)
-- ARGV:
--   1  time shift ms (0 in production)
-- Returns per key: requests in the window, tokens in the window, cooldown left (ms),
-- suspension left (ms).

local shift = tonumber(ARGV[1])
assert(shift and #KEYS % 4 == 0, 'arguments')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
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
for i = 1, #KEYS, 4 do
  out[#out + 1] = counted(KEYS[i])
  out[#out + 1] = counted(KEYS[i + 1])
    out[#out + 1] = math.max(0, tonumber(redis.call('GET', KEYS[i + 2]) or '0') - now)
  out[#out + 1] = math.max(0, tonumber(redis.call('GET', KEYS[i + 3]) or '0') - now)
end
return out
