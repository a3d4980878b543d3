-- ladder a: EVALSHA's fixed cost: admit_window.lua's 1 key and 6 arguments, nothing called.
-- Benches only (benches/admit/yardsticks.rs, `ladder`): each step adds one redis.call of
-- lua/admit_window.lua's common path to the one before it.
return 0
