-- ladder c: b + the HMGET of the 6 fields admit_window.lua reads (both windows' sum, 'lo'
-- and this second's bucket).
local t = redis.call('TIME')
local bs = t[1]
local h = redis.call('HMGET', KEYS[1], 's', 'lo', bs, 'ts', 'tlo', 't' .. bs)
return 0
