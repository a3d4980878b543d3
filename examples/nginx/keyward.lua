-- keyward.lua: the nginx side of keyward (lua-nginx-module), used by keyward.conf.
--
-- access():        asks keyward's /authz with the client's key headers and the first
--                  64 KiB of the request body (so keyward sees `model` and `max_tokens`);
--                  passes keyward's refusals on as they are; hands the upstream only the
--                  provider key keyward picked.
-- header_filter(): keeps the upstream's headers keyward reads, gives the client keyward's
--                  rate-limit headers, drops any x-keyward-* header of the upstream's.
-- body_filter():   keeps the answer's first 64 KiB and a rolling last 64 KiB while it
--                  streams on to the client untouched.
-- log():           posts them to /v1/report/upstream (from a timer, over a cosocket),
--                  authorized by the request's lease, for every admitted request.
-- Meanwhile a timer renews the lease at a third of its TTL until the answer is over,
-- so one that outlasts KEYWARD_LEASE_TTL_S keeps its slot and its balance hold.
--
-- keyward's address is the nginx variable $keyward_address (IP:port, set in
-- keyward.conf: a host name would need an nginx resolver). Both calls go over cosockets with a keepalive pool.

local M = {}

-- How much of the request body keyward reads, and how much of the answer it gets
-- (head and tail each; the bound of /v1/report/upstream).
local BODY, HEAD, TAIL = 65536, 65536, 65536

-- Headers that never reach the upstream besides x-keyward-*: the client's key, and the
-- ones that pick the upstream account or project (with them a client could make the
-- upstream refuse keyward's key with a 401/403, which suspends it for every tenant).
local CLIENT_ONLY = {
  "authorization", "x-api-key", "x-goog-api-key", "api-key",
  "openai-organization", "openai-project", "x-goog-user-project",
}

-- The client's headers keyward sees: its key and the body's type.
local TO_KEYWARD = { "authorization", "x-api-key", "x-goog-api-key", "api-key", "content-type" }

-- keyward's answer headers passed on with a refusal, and (the rate-limit ones) with an
-- admitted request's answer.
local function refusal_header(name)
  return name == "content-type" or name == "retry-after" or name == "x-keyward-status"
    or name == "x-keyward-error" or name == "ratelimit" or name == "ratelimit-policy"
    or string.sub(name, 1, 12) == "x-ratelimit-"
end

-- The upstream's headers keyward reads: the encoding, Retry-After, rate limits.
local function reported_header(name)
  return name == "content-encoding" or name == "retry-after"
    or string.sub(name, 1, 12) == "x-ratelimit-"
    or string.sub(name, 1, 20) == "anthropic-ratelimit-"
end

-- A JSON string of any bytes (control, quote, backslash and non-ASCII escaped byte by
-- byte, as the Envoy filter does).
local function json_string(s)
  return '"' .. string.gsub(s, '[%c"\\\128-\255]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end) .. '"'
end

-- One HTTP/1.1 request to keyward: status, headers (lower-case names) and body, or nil
-- and an error. The connection goes back to the pool when the answer was read whole.
local function call(address, method, path, headers, body, timeouts)
  local host, port = string.match(address or "", "^(.+):(%d+)$")
  if not host then return nil, "$keyward_address is not host:port" end
  local sock = ngx.socket.tcp()
  sock:settimeouts(timeouts[1], timeouts[2], timeouts[3])
  local ok, err = sock:connect(host, tonumber(port))
  if not ok then return nil, err end
  local lines = { method .. " " .. path .. " HTTP/1.1", "Host: keyward",
    "Content-Length: " .. #body }
  for name, value in pairs(headers) do lines[#lines + 1] = name .. ": " .. value end
  lines[#lines + 1] = ""
  lines[#lines + 1] = body
  ok, err = sock:send(table.concat(lines, "\r\n"))
  if not ok then sock:close() return nil, err end
  local line
  line, err = sock:receive("*l")
  local status = line and tonumber(string.match(line, "^HTTP/1%.%d (%d%d%d)"))
  if not status then sock:close() return nil, err or "not an HTTP answer" end
  local got = {}
  while true do
    line, err = sock:receive("*l")
    if not line then sock:close() return nil, err end
    if line == "" then break end
    local name, value = string.match(line, "^([^:]+):%s*(.-)%s*$")
    if name then got[string.lower(name)] = value end
  end
  local parts = {}
  if got["transfer-encoding"] == "chunked" then
    while true do
      line, err = sock:receive("*l")
      local size = line and tonumber(string.match(line, "^%x+"), 16)
      if not size then sock:close() return nil, err or "bad chunk" end
      if size == 0 then
        repeat line, err = sock:receive("*l") until not line or line == ""
        if not line then sock:close() return nil, err end
        break
      end
      parts[#parts + 1], err = sock:receive(size)
      if not parts[#parts] or not sock:receive("*l") then sock:close() return nil, err end
    end
  elseif tonumber(got["content-length"] or "0") > 0 then
    parts[1], err = sock:receive(tonumber(got["content-length"]))
    if not parts[1] then sock:close() return nil, err end
  end
  -- Idle in the pool at most 5 s: keyward closes a connection idle for 10 s, and a
  -- request sent on one it is closing would fail.
  if got["connection"] == "close" then sock:close() else sock:setkeepalive(5000, 32) end
  return { status = status, headers = got, body = table.concat(parts) }
end

-- The request body's first BODY bytes: from memory, or from the file nginx wrote a
-- larger body to. A body cut short is fine: keyward reads it as far as it goes.
local function body_head()
  ngx.req.read_body()
  local data = ngx.req.get_body_data()
  if data then return string.sub(data, 1, BODY) end
  local path = ngx.req.get_body_file()
  local file = path and io.open(path, "rb")
  if not file then return "" end
  data = file:read(BODY) or ""
  file:close()
  return data
end

-- The leases of this worker's requests in flight, each with its address and when it is
-- next renewed. One timer per worker renews those due (a timer per request would stay
-- pending for half a TTL after its request, and nginx caps pending timers).
local live, renewing = {}, false

local function renew_due(premature)
  if premature then return end
  local now, due = ngx.now(), {}
  for lease, r in pairs(live) do
    if r.at <= now then
      r.at = now + r.every
      due[#due + 1] = { lease, r.address }
    end
  end
  for _, d in ipairs(due) do
    local answer, err = call(d[2], "POST", "/v1/leases/" .. d[1] .. "/renew", {}, "",
      { 200, 1000, 1000 })
    if not answer then
      ngx.log(ngx.ERR, "keyward: the lease renewal failed: ", err)
    elseif answer.status ~= 200 then
      live[d[1]] = nil -- reported or expired meanwhile: nothing to keep
    end
  end
end

local function unavailable(err)
  ngx.log(ngx.ERR, "keyward: the admission failed: ", err)
  ngx.status = 503
  ngx.header["Content-Type"] = "application/json"
  ngx.print('{"error": {"code": "BACKEND_UNAVAILABLE", "message": "the admission service cannot be reached"}}')
  return ngx.exit(ngx.HTTP_OK)
end

function M.access()
  local request = ngx.req.get_headers(0)
  local headers = { ["X-Original-URI"] = ngx.var.request_uri, ["X-Keyward-Select"] = "true" }
  for _, name in ipairs(TO_KEYWARD) do
    local value = request[name]
    -- A header sent twice is not passed on (keyward would see a list).
    if type(value) == "string" then headers[name] = value end
  end
  local answer, err = call(ngx.var.keyward_address, "POST", "/authz", headers, body_head(),
    { 200, 1000, 1000 })
  -- keyward's own answers carry x-keyward-status; anything else (unreachable, a 5xx of
  -- something in between) fails closed.
  if not answer then return unavailable(err) end
  if answer.status ~= 200 then
    if not answer.headers["x-keyward-status"] then
      return unavailable("status " .. answer.status)
    end
    ngx.status = answer.status
    for name, value in pairs(answer.headers) do
      if refusal_header(name) then ngx.header[name] = value end
    end
    ngx.print(answer.body)
    return ngx.exit(ngx.HTTP_OK)
  end
  -- Without a lease nothing could be reported: never proxy such a request.
  if not answer.headers["x-keyward-lease"] then return unavailable("no lease") end
  local ctx = ngx.ctx
  ctx.keyward_lease = answer.headers["x-keyward-lease"]
  ctx.keyward_limits = {}
  for name, value in pairs(answer.headers) do
    if string.sub(name, 1, 12) == "x-ratelimit-" then ctx.keyward_limits[name] = value end
  end
  ctx.keyward_started = ngx.now()
  -- The lease id carries its expiry (Unix ms, its fourth field): renew at a third of
  -- the TTL while the answer lasts.
  local expiry = tonumber(string.match(ctx.keyward_lease, "^[^.]*%.[^.]*%.[^.]*%.(%d+)%."))
  if expiry then
    local every = math.max(0.1, (expiry / 1000 - ngx.now()) / 3)
    live[ctx.keyward_lease] = { address = ngx.var.keyward_address, every = every,
      at = ngx.now() + every }
    if not renewing then
      local ok, terr = ngx.timer.every(0.25, renew_due)
      if ok then renewing = true else
        ngx.log(ngx.ERR, "keyward: the lease renewals could not be scheduled: ", terr)
      end
    end
  end
  -- The upstream gets the provider key keyward picked, and nothing of keyward's or of
  -- the client's key.
  for name, _ in pairs(request) do
    if string.sub(name, 1, 10) == "x-keyward-" then ngx.req.clear_header(name) end
  end
  for _, name in ipairs(CLIENT_ONLY) do ngx.req.clear_header(name) end
  local upstream_auth = answer.headers["x-keyward-upstream-authorization"]
  if upstream_auth then ngx.req.set_header("Authorization", upstream_auth) end
  -- keyward reads the usage from the answer's bytes: ask for them uncompressed.
  ngx.req.set_header("Accept-Encoding", "identity")
end

function M.header_filter()
  local ctx = ngx.ctx
  if not ctx.keyward_lease then return end
  local reported, n = {}, 0
  for name, value in pairs(ngx.resp.get_headers(0)) do
    if string.sub(name, 1, 10) == "x-keyward-" then
      ngx.header[name] = nil
    elseif n < 64 and reported_header(name) then
      if type(value) == "table" then value = value[1] end
      reported[#reported + 1] = json_string(name) .. ":" .. json_string(value)
      n = n + 1
    end
  end
  ctx.keyward_headers = table.concat(reported, ",")
  -- The client sees its own key's limits, as keyward counts them.
  for name, value in pairs(ctx.keyward_limits) do ngx.header[name] = value end
  ctx.keyward_head, ctx.keyward_tail, ctx.keyward_kept, ctx.keyward_total = "", {}, 0, 0
end

-- The answer passes on untouched (ngx.arg[1] is never changed, nothing is held back).
function M.body_filter()
  local ctx = ngx.ctx
  if not ctx.keyward_head then return end
  local chunk = ngx.arg[1] or ""
  local len = #chunk
  if #ctx.keyward_head < HEAD then
    ctx.keyward_head = ctx.keyward_head .. string.sub(chunk, 1, HEAD - #ctx.keyward_head)
  end
  if len > 0 then
    local parts = ctx.keyward_tail
    parts[#parts + 1] = string.sub(chunk, -TAIL)
    ctx.keyward_kept = ctx.keyward_kept + math.min(len, TAIL)
    ctx.keyward_total = ctx.keyward_total + len
    if ctx.keyward_kept > 2 * TAIL then
      local tail = string.sub(table.concat(parts), -TAIL)
      ctx.keyward_tail, ctx.keyward_kept = { tail }, #tail
    end
  end
  if ngx.arg[2] then ctx.keyward_eof = true end
end

local function post(premature, address, lease, report)
  local answer, err = call(address, "POST", "/v1/report/upstream",
    { ["Content-Type"] = "application/json", ["X-Keyward-Lease"] = lease }, report,
    { 200, 1000, 1000 })
  if not answer then
    ngx.log(ngx.ERR, "keyward: the report failed: ", err)
  elseif answer.status >= 300 then
    ngx.log(ngx.ERR, "keyward: the report was refused: ", answer.status, " ", answer.body)
  end
end

-- After the answer (or the client's disconnect): the report, for every admitted request.
function M.log()
  local ctx = ngx.ctx
  if not ctx.keyward_lease then return end
  live[ctx.keyward_lease] = nil
  local total = ctx.keyward_total or 0
  local head = ctx.keyward_head or ""
  local tail = string.sub(table.concat(ctx.keyward_tail or {}), -TAIL)
  -- Whether head then tail is exactly the answer: all of it went to the client, with
  -- nothing missing between them.
  local complete = ctx.keyward_eof == true and total <= HEAD + TAIL
  if total <= HEAD then
    tail = ""
  elseif total <= HEAD + TAIL then
    tail = string.sub(tail, -(total - HEAD))
  end
  -- The upstream's status (the last one tried), else nginx's own (502 when it could
  -- not reach the upstream).
  local status = tonumber(string.match(ngx.var.upstream_status or "", "(%d%d%d)%s*$"))
    or ngx.status
  ngx.update_time()
  local report = '{"status":' .. status
    .. ',"path":' .. json_string(string.match(ngx.var.request_uri, "^[^?]*"))
    .. ',"headers":{' .. (ctx.keyward_headers or "") .. '}'
    .. ',"head":"' .. ngx.encode_base64(head) .. '"'
    .. ',"tail":"' .. ngx.encode_base64(tail) .. '"'
    .. ',"complete":' .. tostring(complete)
    .. ',"latency_ms":' .. math.max(0, math.floor((ngx.now() - ctx.keyward_started) * 1000))
    .. '}'
  -- Cosockets are not available in the log phase: a timer sends it (the client waits
  -- for nothing).
  local ok, err = ngx.timer.at(0, post, ngx.var.keyward_address, ctx.keyward_lease, report)
  if not ok then ngx.log(ngx.ERR, "keyward: the report could not be scheduled: ", err) end
end

return M
