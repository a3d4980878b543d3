-- report.lua: settle one finished request, exactly once, and queue it for the database.
--
-- KEYS (all under the deployment's hash tag):
--   1  tpm     hash    the key's token window (see admit.lua; 's' is kept equal to the sum)
--   2  leases  zset    lease token -> expiry (ms)
--   3  ld      hash    lease token -> "bucket|reserved_tokens|provider|model|api_format"
--   4  bal     hash    live balance (see admit.lua)
--   5  done    string  marker that this lease id was reported (the duplicate guard)
--   6  usage   stream  the accounting queue read by every replica's writer
-- ARGV:
--   1  lease token            2  lease id (as the client knows it)    3  key id
--   4  tokens reported (1/0)  5  prompt tokens    6  completion tokens
--   7  cost micro-USD (>= 0)  8  duplicate guard ttl ms (> 0)
--   9  model ("" = the one given at admission)    10 provider key id ("" = none)
--   11 latency ms ("" = unknown)                  12 upstream status ("" = unknown)
--   13 time shift ms (0 in production)
-- Returns {1, now_ms} when recorded, {0, now_ms} for a duplicate (nothing changed).
--
-- In one step: the slot is released, the token reservation is replaced by the actual
-- count in the bucket where it was made (if that bucket is still in the window, and only
-- when tokens were reported), the balance is debited, and the usage entry is appended to
-- the stream. A lease that already expired is still recorded and debited.

local token, lease_id, key_id = ARGV[1], ARGV[2], ARGV[3]
local has_tokens = ARGV[4] == '1'
local prompt = tonumber(ARGV[5])
local completion = tonumber(ARGV[6])
local cost = tonumber(ARGV[7])
local guard_ttl = tonumber(ARGV[8])
local shift = tonumber(ARGV[13])
assert(#token > 0 and #lease_id > 0 and #key_id > 0, 'ids')
assert(prompt and prompt >= 0 and completion and completion >= 0, 'tokens')
assert(cost and cost >= 0, 'cost')
assert(guard_ttl and guard_ttl > 0, 'guard ttl')
assert(shift, 'time shift')

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift

if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', guard_ttl) then
  return {0, now}
end

local provider, model, api_format = '', ARGV[9], ''
local data = redis.call('HGET', KEYS[3], token)
if data then
  local fields = {}
  for part in string.gmatch(data .. '|', '([^|]*)|') do fields[#fields + 1] = part end
  local bucket, reserved = tonumber(fields[1]), tonumber(fields[2])
  provider, api_format = fields[3] or '', fields[5] or ''
  if model == '' then model = fields[4] or '' end
  redis.call('HDEL', KEYS[3], token)
  redis.call('ZREM', KEYS[2], token)
  local b = math.floor(now / 1000)
  if has_tokens and reserved and bucket >= b - 60 then
    local old = tonumber(redis.call('HGET', KEYS[1], bucket))
    if old then
      local new = math.max(0, old + prompt + completion - reserved)
      redis.call('HSET', KEYS[1], bucket, new)
      redis.call('HINCRBY', KEYS[1], 's', new - old)
    end
  end
end

if redis.call('EXISTS', KEYS[4]) == 1 then
  if cost > 0 then redis.call('HINCRBY', KEYS[4], 'rem', -cost) end
  local hwm = tonumber(redis.call('HGET', KEYS[4], 'hwm') or '-1')
  if cost > hwm then redis.call('HSET', KEYS[4], 'hwm', cost) end
end

redis.call('XADD', KEYS[6], '*',
  'id', lease_id, 'key', key_id, 'provider', provider, 'model', model, 'fmt', api_format,
  'pk', ARGV[10], 'pt', prompt, 'ct', completion, 'cost', cost,
  'lat', ARGV[11], 'st', ARGV[12], 'ts', now)
return {1, now}
