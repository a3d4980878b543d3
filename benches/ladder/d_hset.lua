-- ladder d: c + the HSET of admit_window.lua's admitted path (8 arguments: both windows'
-- bucket and sum). The full admit_window.lua is the next step: its Lua work (arguments,
-- asserts, formatting, the take's table), the PEXPIRE once a second and its 11-value reply.
local t = redis.call('TIME')
local bs = t[1]
local h = redis.call('HMGET', KEYS[1], 's', 'lo', bs, 'ts', 'tlo', 't' .. bs)
redis.call('HSET', KEYS[1], bs, (tonumber(h[3]) or 0) + 1, 's', (tonumber(h[1]) or 0) + 1,
  't' .. bs, (tonumber(h[6]) or 0) + 100, 'ts', (tonumber(h[4]) or 0) + 100)
return 0
