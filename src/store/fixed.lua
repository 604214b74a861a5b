-- ratelimitd: a request whose checks are all fixed windows charged unconditionally
-- (`Charging::Always`, every cost within its limit), so nothing written depends on what is
-- read: INCRBY and EXPIRE per key, as the reference sends them, in one atomic call. The
-- verdicts are computed by the caller from the counts returned (src/store/script.rs feeds
-- them to engine.rs `decide`), exactly as engine.lua would decide; tests/redis_engine.rs
-- holds the two to it. About a fifth of engine.lua's cost in Redis (docs/benchmarks.md).
--
-- KEYS: each check's counter, in check order (a key may repeat: checks sharing a counter
-- count one after the other).
-- ARGV: 2 per check: cost (0..2^32-1), ttl_secs (the window plus jitter, from now: the
-- reference's EXPIRE on every increment, and engine.lua's `SET … EX` for fixed windows).
--
-- Returns each check's count after its increment, in check order: an integer, or a decimal
-- string from 2^53 on (a Lua number is a double; GET gives the exact value).
--
-- Counts saturate at 2^63-1 as engine.lua's do: where INCRBY would overflow, the key is set
-- to 2^63-1. A key holding anything but a count (what INCRBY refuses, or a negative
-- integer) fails the call, and what the earlier INCRBYs wrote is undone first (newest first;
-- a key this call created is deleted), so a failed call writes nothing, as engine.lua
-- guarantees by reading before it writes. TTLs are set only once every INCRBY has
-- succeeded, so an undone key keeps the TTL it had.

local MAX_COUNT = '9223372036854775807'
local EXACT = 9007199254740992 -- 2^53

local counts = {}
-- The value before the increment, for a key that was saturated (its INCRBY did not run).
local saturated_from = {}

local function undo(n)
  for j = n, 1, -1 do
    local key, cost = KEYS[j], ARGV[2 * j - 1]
    if saturated_from[j] then
      redis.call('SET', key, saturated_from[j], 'KEEPTTL')
    elseif tostring(counts[j]) == cost then
      -- Absent (or 0) before this call: absent again.
      redis.call('DEL', key)
    else
      redis.call('DECRBY', key, cost)
    end
  end
end

if #ARGV ~= 2 * #KEYS then
  return redis.error_reply('ratelimitd: ARGV must hold 2 fields per key')
end

for i, key in ipairs(KEYS) do
  local v = redis.pcall('INCRBY', key, ARGV[2 * i - 1])
  if type(v) == 'table' and v.err then
    if string.find(v.err, 'overflow', 1, true) then
      saturated_from[i] = redis.call('GET', key)
      redis.call('SET', key, MAX_COUNT, 'KEEPTTL')
      v = MAX_COUNT
    else
      -- Not a count (WRONGTYPE, not an integer), or no write at all (READONLY on a replica,
      -- OOM): Redis's own error, its code first, so the caller sorts it as it sorts
      -- engine.lua's (READONLY replaces the connection).
      undo(i - 1)
      return redis.error_reply(v.err .. ' (ratelimitd: ' .. key .. ')')
    end
  elseif v < tonumber(ARGV[2 * i - 1]) then
    -- Negative before: not a count of ours (engine.lua refuses it too).
    counts[i] = v
    undo(i)
    return redis.error_reply('ratelimitd: ' .. key .. ' holds a negative value, not a count')
  elseif v >= EXACT then
    v = redis.call('GET', key)
  end
  counts[i] = v
end

for i, key in ipairs(KEYS) do
  redis.call('EXPIRE', key, ARGV[2 * i])
end

return counts
