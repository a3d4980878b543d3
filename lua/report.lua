-- report.lua: settle one finished request, exactly once, and queue it for the database.
--
-- KEYS (all under the deployment's hash tag):
--   1  tpm     hash    the client key's token window (see admit.lua)
--   2  leases  zset    lease token -> expiry (ms)
--   3  ld      hash    lease token -> "bucket|reserved|provider|model|api_format|pk id|pk reserved"
--   4  bal     hash    live balance (see admit.lua)
--   5  done    string  when the duplicate guard of this lease id lapses (ms): it was reported
--   6  usage   stream  the accounting queue read by every replica's writer
--   and, when a provider key is named (ARGV[10]):
--   7  pk tpm  hash    the provider key's token window
--   8  pk cd   string  when the provider key's cooldown ends (ms; the key expires then too)
--   9  pk susp string  when its suspension ends (ms)
--   10 pk cause hash   'cd' / 'susp' -> "status|at ms|source": the report behind the
--                      cooldown / suspension (the hash expires with the later of them)
-- ARGV:
--   1  lease token ("" = a report without a lease: nothing to settle or deduplicate)
--   2  lease id or record id     3  client key id ("" = none)
--   4  tokens reported (1/0)     5  prompt tokens    6  completion tokens
--   7  cost micro-USD (>= 0)     8  duplicate guard ttl ms (> 0)
--   9  model ("" = the one given at admission)       10 provider key id ("" = none)
--   11 latency ms ("" = unknown)                     12 upstream status ("" = unknown)
--   13 time shift ms (0 in production)
--   14 cooldown ms (> 0 after an upstream 429)      15 suspension ms (> 0 after 401/403)
--   16 source ("lease <lease id>" or "data-token"; kept as the cause, cut to 200 bytes)
--   17 the expiry signed into the lease id (ms; 0 = no lease)
-- Returns {1, now_ms} when recorded, {0, now_ms} for a duplicate, {2, now_ms} when the
-- report comes later than the guard ttl after the lease's expiry (nothing changed in
-- either case).
--
-- The duplicate guard lives until the guard ttl after the lease's latest expiry (the
-- signed one, or a later one after renewals), and a report is refused after that: so a
-- lease can never be reported twice, however late the repeat.
--
-- In one step: the slot is released, token reservations (client's and provider key's)
-- are replaced by the actual count in the second where they were made (if still in the
-- window, and only when tokens were reported), the balance is debited, the provider key
-- is cooled down or suspended, and the usage entry is appended to the stream. A lease
-- that already expired is still recorded and debited.

local token, lease_id, key_id = ARGV[1], ARGV[2], ARGV[3]
local has_tokens = ARGV[4] == '1'
local prompt = tonumber(ARGV[5])
local completion = tonumber(ARGV[6])
local cost = tonumber(ARGV[7])
local guard_ttl = tonumber(ARGV[8])
local pk = ARGV[10]
local shift = tonumber(ARGV[13])
local cooldown = tonumber(ARGV[14])
local suspend = tonumber(ARGV[15])
local signed_expiry = tonumber(ARGV[17])
assert(#lease_id > 0, 'id')
assert(prompt and prompt >= 0 and completion and completion >= 0, 'tokens')
assert(cost and cost >= 0, 'cost')
assert(guard_ttl and guard_ttl > 0, 'guard ttl')
assert(shift and cooldown and cooldown >= 0 and suspend and suspend >= 0, 'times')
assert(signed_expiry and signed_expiry >= 0, 'lease expiry')
assert(#KEYS == (pk == '' and 6 or 10), 'provider key keys')

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + shift
local b = math.floor(now / 1000)

-- A whole number as Redis takes it (Lua's own conversion may say "1e+14").
local function int(x) return string.format('%.0f', x) end

-- Replaces `reserved` tokens taken at second `bucket` by the actual count.
local function settle(key, bucket, reserved)
  if not (has_tokens and reserved and bucket >= b - 60) then return end
  local old = tonumber(redis.call('HGET', key, bucket))
  if old then
    local new = math.max(0, old + prompt + completion - reserved)
    redis.call('HSET', key, bucket, new)
    redis.call('HINCRBY', key, 's', new - old)
  end
end

local provider, model, api_format = '', ARGV[9], ''
if token ~= '' then
  local expiry = math.max(signed_expiry, tonumber(redis.call('ZSCORE', KEYS[2], token) or '0'))
  -- The guard holds the time it lapses, on the script clock; "1" is a guard written by
  -- an older release, live until its own expiry.
  local guard = tonumber(redis.call('GET', KEYS[5]) or '0')
  if guard == 1 or guard > now then return {0, now} end
  if signed_expiry > 0 and now > expiry + guard_ttl then return {2, now} end
  local lapses = math.max(now, expiry) + guard_ttl
  redis.call('SET', KEYS[5], int(lapses), 'PX', int(lapses - now))
  local data = redis.call('HGET', KEYS[3], token)
  if data then
    local f = {}
    for part in string.gmatch(data .. '|', '([^|]*)|') do f[#f + 1] = part end
    local bucket = tonumber(f[1])
    provider, api_format = f[3] or '', f[5] or ''
    if model == '' then model = f[4] or '' end
    redis.call('HDEL', KEYS[3], token)
    redis.call('ZREM', KEYS[2], token)
    settle(KEYS[1], bucket, tonumber(f[2]))
    if pk ~= '' and f[6] == pk then settle(KEYS[7], bucket, tonumber(f[7])) end
  end
  if redis.call('EXISTS', KEYS[4]) == 1 then
    if cost > 0 then redis.call('HINCRBY', KEYS[4], 'rem', -cost) end
    local hwm = tonumber(redis.call('HGET', KEYS[4], 'hwm') or '-1')
    if cost > hwm then redis.call('HSET', KEYS[4], 'hwm', cost) end
  end
end

if pk ~= '' then
    -- The end is a time on the script clock, compared with `now` by admit.lua; the
  -- expiry only tidies up.
  if cooldown > 0 then redis.call('SET', KEYS[8], now + cooldown, 'PX', cooldown) end
  if suspend > 0 then redis.call('SET', KEYS[9], now + suspend, 'PX', suspend) end
  if cooldown > 0 or suspend > 0 then
    -- Who stopped the key, shown by pool_state.lua while the cooldown / suspension lasts.
    local cause = ARGV[12] .. '|' .. string.format('%.0f', now) .. '|' .. string.sub(ARGV[16] or '', 1, 200)
    if cooldown > 0 then redis.call('HSET', KEYS[10], 'cd', cause) end
    if suspend > 0 then redis.call('HSET', KEYS[10], 'susp', cause) end
    redis.call('PEXPIRE', KEYS[10], math.max(cooldown, suspend, redis.call('PTTL', KEYS[10])))
  end
end

redis.call('XADD', KEYS[6], '*',
  'id', lease_id, 'key', key_id, 'provider', provider, 'model', model, 'fmt', api_format,
  'pk', pk, 'pt', prompt, 'ct', completion, 'cost', cost,
  'lat', ARGV[11], 'st', ARGV[12], 'ts', now)
return {1, now}
