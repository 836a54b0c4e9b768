-- wrk script of the benchmark: `wrk ... -s load.lua URL -- MODE USERS DOMAINS PATH`
--   MODE users: GET /users?email=<a random existing e-mail> on every request; USERS is the
--               number of seeded users, DOMAINS the comma-separated domain slots (user i has
--               the e-mail user<i>@<slot[i % #slots]>, as bench/sql/seed.sql writes it);
--   MODE path:  GET PATH on every request.
--   MODE create: POST /users with a new e-mail on every request (soak-<seed>-<k>@soakmail.com;
--               the seed differs per thread and per run, so no two requests collide).
-- With BENCH_COUNT_STATUS=1 in the environment every response's status is counted (it costs
-- a little client CPU, so the users load leaves it off and relies on wrk's own error count).
-- At the end one line `BENCH_JSON {...}` carries the figures for bench/figures.py to parse.

local threads = {}
local mode, users, slots, path = "path", 1, {}, "/"
local created, run_seed = 0, 0
statuses = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   mode = args[1] or "path"
   users = tonumber(args[2] or "1")
   for slot in string.gmatch(args[3] or "", "[^,]+") do
      table.insert(slots, slot)
   end
   path = args[4] or "/"
   -- Each thread has its own Lua state: seed each differently.
   local seed = tonumber(tostring({}):match("0x(%x+)") or "1", 16) or 1
   math.randomseed(os.time() + seed)
   run_seed = math.random(1, 2^31)
end

function request()
   if mode == "users" then
      local i = math.random(1, users)
      local domain = slots[(i % #slots) + 1]
      return wrk.format("GET", "/users?email=user" .. i .. "%40" .. domain)
   end
   if mode == "create" then
      created = created + 1
      local body = string.format(
         '{"email":"soak-%d-%d@soakmail.com","name":"Soak %d"}', run_seed, created, created)
      return wrk.format("POST", "/users", {["Content-Type"] = "application/json"}, body)
   end
   return wrk.format("GET", path)
end

if os.getenv("BENCH_COUNT_STATUS") == "1" then
   function response(status, headers, body)
      statuses[status] = (statuses[status] or 0) + 1
   end
end

function done(summary, latency, requests)
   local counted = {}
   for _, thread in ipairs(threads) do
      local seen = thread:get("statuses") or {}
      for status, n in pairs(seen) do
         counted[status] = (counted[status] or 0) + n
      end
   end
   local parts = {}
   for status, n in pairs(counted) do
      table.insert(parts, string.format('"%d":%d', status, n))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d},' ..
      '"statuses":{%s}}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9),
      table.concat(parts, ",")))
end
