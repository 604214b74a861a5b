-- ratelimitd: one request's checks decided together, atomically (RedisStore::decide).
--
-- This is src/limiter/engine.rs `decide` and src/limiter/algorithm.rs `evaluate`, operation
-- for operation, so the Redis and in-memory stores decide alike (tests/redis_engine.rs holds
-- them to it). Read those first; every function below names its Rust twin. The README's
-- "The Redis script" section explains the layout and why this is a script.
--
-- KEYS, in check order: each check's state key, followed, for a sliding window, by its
-- previous window's key (ARGV says which checks have one).
--
-- ARGV (all decimal integers unless noted):
--   [1] now_ms          the caller's clock, Unix milliseconds (one clock per decision)
--   [2] charging        'always' | 'stop_when_over' | 'only_over' | 'all_or_nothing' | 'never'
--   [3] never_refuse    0 | 1 (SHADOW_MODE)
--   [4] quota_total     quota descriptors in the request
--   [5] D               limited descriptors; then 2 fields per descriptor d = 0..D-1:
--       shadow (0|1), quota (0|1)
--   then 8 fields per check:
--       descriptor      0-based index into the descriptors above
--       algorithm       'fixed' | 'sliding' | 'bucket'
--       limit           requests_per_unit
--       window_ms       unit x multiplier, in ms
--       capacity        the bucket's burst (0 when limit is 0); the limit for windows
--       cost            hits_addend, up to 2^64-1
--       jitter_secs     extra life for the keys written
--       previous        1 when the check has a previous key in KEYS (sliding windows), else 0;
--                       or 'c' followed by the previous window's stored value (REDIS_TYPE=
--                       cluster, where that key may live on another node: read beforehand,
--                       see src/store/cluster.rs), checked here as a count like any other
--
-- Returns 8 values per check, flattened, in check order:
--   allowed (0|1), remaining, reset_ms, retry_ms, used, charged (0|1), state_a, state_b
-- `used`, `state_a` and `state_b` are decimal strings (a count can reach 2^63-1, beyond a
-- double's exact integers); the others are integers below 2^53. `state_*` is the state
-- written when charged (see algorithm.rs `State`), else the one read.
--
-- Stored values:
--   fixed / sliding window  a count: a decimal integer string, 0..2^63-1 (INCRBY-compatible)
--   token bucket            "TAT:remainder": TAT in Unix ms, remainder in 1/limit ms
-- Absent keys read as zero. Any other value fails the whole script before anything is
-- written: all reads come first, all writes last, and SET cannot fail on a key's type.
--
-- Numbers. Lua numbers are doubles. Every token-bucket quantity is an integer of at most
-- 2^53 (the model bounds burst x window at 2^52), so it is exact, and integer division uses
-- math.fmod, which C defines as exact: q = (x - fmod(x, y)) / y divides an exact multiple and
-- needs no correction step. Counts (up to 2^63-1) are added exactly in two limbs of 10^9 and
-- saturate at 2^63-1 as in the model; a count is converted to a double only where the model
-- converts it (`as f64`), by tonumber, which rounds to nearest as Rust's `as f64` does. The
-- sliding window's f64 operations are the model's, in the model's order (each Lua operator
-- is one IEEE operation: nothing is fused).

local now = tonumber(ARGV[1])
local charging = ARGV[2]
local never_refuse = ARGV[3] == '1'
local quota_total = tonumber(ARGV[4])
local ndesc = tonumber(ARGV[5])
local FIELDS = 8
local first = 6 + 2 * ndesc

if charging ~= 'always' and charging ~= 'stop_when_over' and charging ~= 'all_or_nothing'
  and charging ~= 'never' and charging ~= 'only_over' then
  return redis.error_reply('ratelimitd: unknown charging mode ' .. tostring(charging))
end
if (#ARGV - first + 1) % FIELDS ~= 0 then
  return redis.error_reply('ratelimitd: ARGV holds no whole number of checks')
end

-- Exact unsigned integers up to 20 digits: hi x 10^9 + lo, both exact doubles ----------------

local BASE = 1e9
local MAX_HI, MAX_LO = 9223372036, 854775807 -- MAX_COUNT = 2^63 - 1
local MAX_COUNT = '9223372036854775807'
local U64_MAX = '18446744073709551615'
local TWO_64 = 18446744073709551616

local function limbs(s)
  local n = #s
  if n <= 9 then
    return 0, tonumber(s)
  end
  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
end

local function from_limbs(hi, lo)
  if hi == 0 then
    return string.format('%.0f', lo)
  end
  return string.format('%.0f', hi) .. string.format('%09.0f', lo)
end

-- An integral double below 2^53 as a decimal string (tostring would print 1e+15).
local function int(x)
  return string.format('%.0f', x)
end

-- `a.saturating_add(b).min(MAX_COUNT)` on decimal strings.
local function count_add(a, b)
  local ah, al = limbs(a)
  local bh, bl = limbs(b)
  local hi, lo = ah + bh, al + bl
  if lo >= BASE then
    hi, lo = hi + 1, lo - BASE
  end
  if hi > MAX_HI or (hi == MAX_HI and lo > MAX_LO) then
    return MAX_COUNT
  end
  return from_limbs(hi, lo)
end

-- A stored count, normalised; anything but 0..MAX_COUNT is someone else's value.
local function count_of(key, v)
  if not v then
    return '0'
  end
  if not string.match(v, '^%d+$') or #v > 20 then
    return error('ratelimitd: ' .. key .. ' holds ' .. v .. ', not a count')
  end
  local hi, lo = limbs(v)
  if hi > MAX_HI or (hi == MAX_HI and lo > MAX_LO) then
    return error('ratelimitd: ' .. key .. ' holds ' .. v .. ', above 2^63-1')
  end
  return from_limbs(hi, lo)
end

-- Integer division of doubles below 2^53, exact (see the header).
local function idiv(x, y)
  local r = math.fmod(x, y)
  return (x - r) / y, r
end

local function div_ceil(x, y)
  local q, r = idiv(x, y)
  if r > 0 then
    q = q + 1
  end
  return q
end

-- algorithm.rs ---------------------------------------------------------------------------------

-- `window_start_ms`
local function window_start(w, t)
  local q = idiv(t, math.max(w, 1))
  return q * math.max(w, 1)
end

-- `until_window_end`
local function until_window_end(w, t)
  local secs = math.max(idiv(w, 1000), 1)
  local now_s = idiv(t, 1000)
  local _, r = idiv(now_s, secs)
  return (secs - r) * 1000
end

-- `fixed`. s.a, s.b: counts (strings); cost: a decimal string.
local function fixed(c, s, cost)
  local after = count_add(s.a, cost)
  local reset = until_window_end(c.window, now)
  local allowed = tonumber(cost) <= c.capacity and tonumber(after) <= c.limit
  return {
    allowed = allowed,
    remaining = allowed and c.limit - tonumber(after) or 0,
    reset = reset,
    retry = allowed and 0 or reset,
    used = after,
    a = after,
    b = s.b,
  }
end

-- `sliding_retry`
local function sliding_retry(c, s, cost, w, elapsed)
  local limit = c.limit
  local wf = w
  local left = w - elapsed
  if tonumber(cost) > c.capacity then
    return left
  end
  local room = limit - (tonumber(s.a) + tonumber(cost))
  if room >= 0 and tonumber(s.b) > 0 then
    local t = math.ceil(left - room * wf / tonumber(s.b))
    if t <= left then
      return math.max(t, 1) -- `(t as u64).max(1)`: a negative t saturates to 0
    end
  end
  local room_next = limit - tonumber(cost)
  local t_next = 0
  if tonumber(s.a) ~= 0 then
    t_next = math.max(math.ceil(wf - room_next * wf / tonumber(s.a)), 0)
  end
  return left + t_next
end

-- `sliding`
local function sliding(c, s, cost)
  local w = math.max(c.window, 1)
  local elapsed = now - window_start(w, now)
  local after = count_add(s.a, cost)
  local weight = (w - elapsed) / w
  local estimate = tonumber(s.b) * weight + tonumber(after)
  local allowed = tonumber(cost) <= c.capacity and estimate <= c.limit
  local reset = until_window_end(w, now)
  local remaining = 0
  local retry = 0
  local used
  if allowed then
    remaining = math.floor(c.limit - estimate)
    used = int(c.limit - remaining)
  else
    retry = sliding_retry(c, s, cost, w, elapsed)
    -- `(estimate.ceil() as u64).max(limit + 1)`: `as u64` saturates.
    local e = math.ceil(estimate)
    if e < c.limit + 1 then
      used = int(c.limit + 1)
    elseif e >= TWO_64 then
      used = U64_MAX
    else
      used = int(e)
    end
  end
  return {
    allowed = allowed,
    remaining = remaining,
    reset = reset,
    retry = retry,
    used = used,
    a = after,
    b = s.b,
  }
end

-- `bucket`. s.a: TAT ms, s.b: remainder (numbers).
local function bucket(c, s, cost)
  local limit = math.max(c.limit, 1)
  local w = c.window
  local tolerance = c.capacity * w
  local debt = 0
  if not (s.a < now or (s.a == now and s.b == 0)) then
    debt = (s.a - now) * limit + s.b
  end
  local costn = tonumber(cost)
  -- Above 2^53 these are inexact, but then so far above the cap that the min is the cap.
  local after = math.min(debt + costn * w, 2 ^ 53)
  local allowed = costn <= c.capacity and after <= tolerance
  local verdict_debt, retry = after, 0
  if not allowed then
    local over = math.max(after - tolerance, 0)
    if costn > c.capacity then
      retry = div_ceil(debt, limit)
    else
      retry = div_ceil(over, limit)
    end
    verdict_debt, retry = debt, math.max(retry, 1)
  end
  local remaining = 0
  if allowed then
    remaining = idiv(tolerance - after, math.max(w, 1))
  end
  -- Never charged below empty (a refused bucket is charged only under strict charging, when
  -- the request passes anyway).
  local q, r = idiv(math.min(after, tolerance), limit)
  return {
    allowed = allowed,
    remaining = remaining,
    reset = div_ceil(verdict_debt, limit),
    retry = retry,
    used = int(allowed and c.capacity - remaining or c.capacity + 1),
    a = now + q,
    b = r,
  }
end

local evaluators = { fixed = fixed, sliding = sliding, bucket = bucket }

-- The checks, and their states read at this one instant -----------------------------------------

local checks = {}
local k = 1
for i = first, #ARGV, FIELDS do
  local c = {
    descriptor = tonumber(ARGV[i]),
    algorithm = ARGV[i + 1],
    limit = tonumber(ARGV[i + 2]),
    window = tonumber(ARGV[i + 3]),
    capacity = tonumber(ARGV[i + 4]),
    cost = ARGV[i + 5],
    jitter = tonumber(ARGV[i + 6]),
    key = KEYS[k],
  }
  if not evaluators[c.algorithm] then
    return redis.error_reply('ratelimitd: unknown algorithm ' .. tostring(c.algorithm))
  end
  if not string.match(c.cost, '^%d+$') or #c.cost > 20 then
    return redis.error_reply('ratelimitd: cost ' .. c.cost .. ' is not a u64')
  end
  k = k + 1
  local previous = ARGV[i + 7]
  if previous == '1' then
    c.previous = KEYS[k]
    k = k + 1
  elseif string.sub(previous, 1, 1) == 'c' then
    c.previous_read = string.sub(previous, 2)
  elseif previous ~= '0' then
    return redis.error_reply('ratelimitd: unknown previous field ' .. previous)
  end
  if not c.key or (ARGV[i + 7] == '1' and not c.previous) then
    return redis.error_reply('ratelimitd: fewer KEYS than the checks name')
  end
  checks[#checks + 1] = c
end

local states = {}
for i, c in ipairs(checks) do
  local v = redis.call('GET', c.key)
  if c.algorithm == 'bucket' then
    if v then
      local t, r = string.match(v, '^(%d+):(%d+)$')
      -- Both below 2^53 (the model's bound), so exact.
      if not t or #t > 16 or #r > 16 or tonumber(t) > 2 ^ 53 or tonumber(r) > 2 ^ 53 then
        return error('ratelimitd: ' .. c.key .. ' holds ' .. v .. ', not a bucket')
      end
      states[i] = { a = tonumber(t), b = tonumber(r) }
    else
      states[i] = { a = 0, b = 0 }
    end
  else
    local b = '0'
    if c.previous then
      b = count_of(c.previous, redis.call('GET', c.previous))
    elseif c.previous_read then
      b = count_of('the previous window of ' .. c.key, c.previous_read)
    end
    states[i] = { a = count_of(c.key, v), b = b }
  end
end

-- engine.rs `decide` ----------------------------------------------------------------------------

local function fits(c)
  return tonumber(c.cost) <= c.capacity
end

-- stop_when_over judges every check against what was read (the reference GETs them all first);
-- only_over is stop_when_over with a check already known to be over (the local cache).
local would_over = {}
local any_over = charging == 'only_over'
if charging == 'stop_when_over' or charging == 'only_over' then
  for i, c in ipairs(checks) do
    would_over[i] = not evaluators[c.algorithm](c, states[i], c.cost).allowed
    if would_over[i] then
      any_over = true
    end
  end
end

-- `current`: a check's state as read, unless an earlier check of the batch charged its key (or,
-- for a sliding window, its previous window's key).
local latest = {}
local function current(i, c)
  local s = { a = states[i].a, b = states[i].b }
  local l = latest[c.key]
  if l then
    s.a = l.a
    if not c.previous and not c.previous_read then
      s.b = l.b
    end
  end
  if c.previous then
    local p = latest[c.previous]
    if p then
      s.b = p.a
    end
  end
  return s
end

-- In order: each check sees what the checks before it charged to the same keys.
local outcomes, seen, charged = {}, {}, {}
for i, c in ipairs(checks) do
  local s = current(i, c)
  local o = evaluators[c.algorithm](c, s, c.cost)
  local charge = false
  if fits(c) then
    if charging == 'always' then
      charge = o.allowed or c.algorithm == 'fixed'
    elseif charging == 'stop_when_over' or charging == 'only_over' then
      charge = (not any_over) or (would_over[i] and c.algorithm == 'fixed')
    elseif charging == 'all_or_nothing' then
      -- Tentatively; undone below if the request is refused.
      charge = true
    end
    -- 'never': nothing is charged.
  end
  outcomes[i], seen[i], charged[i] = o, s, charge
  if charge then
    latest[c.key] = { a = o.a, b = o.b }
  end
end

-- `refused`: a refused descriptor neither shadowed nor quota, or every quota descriptor refused.
local function refused()
  if never_refuse then
    return false
  end
  local over = {}
  for i, c in ipairs(checks) do
    if not outcomes[i].allowed then
      over[c.descriptor] = true
    end
  end
  local failed_quota = 0
  for d = 0, ndesc - 1 do
    local shadow = ARGV[6 + 2 * d] == '1'
    local quota = ARGV[7 + 2 * d] == '1'
    if over[d] and not shadow then
      if quota then
        failed_quota = failed_quota + 1
      else
        return true
      end
    end
  end
  return quota_total > 0 and failed_quota == quota_total
end

-- `standing`: a check that fits but is not charged reports its limit as it stands.
local function verdict(c, s, o, charge)
  if charge or not o.allowed then
    return o
  end
  return evaluators[c.algorithm](c, s, '0')
end

local verdicts = {}
if charging == 'all_or_nothing' and refused() then
  -- Nothing is charged: every check as it stands without this request.
  for i, c in ipairs(checks) do
    local o = evaluators[c.algorithm](c, states[i], c.cost)
    charged[i], outcomes[i], seen[i] = false, o, states[i]
    verdicts[i] = verdict(c, states[i], o, false)
  end
  latest = {}
else
  for i, c in ipairs(checks) do
    verdicts[i] = verdict(c, seen[i], outcomes[i], charged[i])
  end
end

local function state_strings(c, a, b)
  if c.algorithm == 'bucket' then
    return int(a), int(b)
  end
  return a, b
end

local reply = {}
for i, c in ipairs(checks) do
  local o, v = outcomes[i], verdicts[i]
  local a, b
  if charged[i] then
    a, b = state_strings(c, o.a, o.b)
  else
    a, b = state_strings(c, seen[i].a, seen[i].b)
  end
  local n = #reply
  reply[n + 1] = (o.allowed) and 1 or 0
  reply[n + 2] = v.remaining
  reply[n + 3] = v.reset
  reply[n + 4] = v.retry
  reply[n + 5] = v.used
  reply[n + 6] = charged[i] and 1 or 0
  reply[n + 7] = a
  reply[n + 8] = b
end

-- Writes, last: the charged states, each with its TTL ------------------------------------------

for i, c in ipairs(checks) do
  if charged[i] then
    local o = outcomes[i]
    local jitter_ms = c.jitter * 1000
    if c.algorithm == 'fixed' then
      -- The reference's TTL: the window plus jitter, from now (EXPIRE on every increment).
      redis.call('SET', c.key, o.a, 'EX', math.max(idiv(c.window, 1000), 1) + c.jitter)
    elseif c.algorithm == 'sliding' then
      -- Until the end of the next window, where it is read as the previous count.
      local w = math.max(c.window, 1)
      local ends = window_start(w, now) + 2 * w + jitter_ms
      redis.call('SET', c.key, o.a, 'PX', int(ends - now))
    else
      -- Until the bucket is full again (TAT + 1 ms), as a TTL from now.
      redis.call('SET', c.key, int(o.a) .. ':' .. int(o.b), 'PX', int(o.a + 1 + jitter_ms - now))
    end
  end
end

return reply
