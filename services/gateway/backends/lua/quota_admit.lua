-- Check (and, in admit mode, take) every quota of one request in one atomic step, and count
-- the request (or its refusal) in the user's usage of the day in the same step.
-- KEYS: 7 per subject: requests-minute zset, requests-day zset, tokens-of-the-day counter,
--       stream-lease zset (member = lease id, score = expiry ms; one per identity, shared by
--       every model, so it counts concurrent streams), the day's reservations hash (lease id
--       -> tokens reserved and not yet settled; plus the day's totals `admitted` and
--       `refunded`, so that admitted - refunded = the counter, for audits), and the counted
--       lease zset (the leases whose reservations that hash holds: the same key as the
--       stream-lease zset, unless the subject is a model with limits of its own), and the
--       pictures-of-the-day counter;
--       then the 2 key-check KEYS (when ARGV[7] is 1), then the 2 usage KEYS (when ARGV[8] is
--       not empty): the user's usage hash of the day and the day's set of users.
-- The first 3 and the reservations hash are the counted subject's (a model with limits of its
-- own has its own: q:<subject>:m:<model>:*).
-- With a token limit, every admitted lease is kept in the counted lease zset (also without a
-- stream limit) and its reservation in the hash, so a lease that expires unsettled (its
-- gateway died mid-request) gets its whole reservation refunded here, by the next call for
-- that subject: nobody pays for a reply the service never finished.
-- ARGV[1] lease id, ARGV[2] tokens to reserve, ARGV[3] lease ms, ARGV[4] ms until the end of
-- the UTC day, ARGV[5] mode ("admit" | "peek"), ARGV[6] number of subjects, ARGV[7] 1 = check
-- an API-key identity, ARGV[8] user id to count usage for ('' = none), ARGV[9] usage keys'
-- TTL in seconds, ARGV[10] pictures the request carries, then 5 limits per subject:
-- requests/minute, requests/day, tokens/day, concurrent streams, pictures/day (0 = unlimited).
-- The key check, for an API-key identity the gateway took from its cache: the key's
-- apikey:<sha256> hash and the user's hash, and 3 more ARGV (the user id, tier and key id it
-- assumed). When the key is gone or no longer grants exactly that, the call takes nothing and
-- returns {0, 0, 'identity_changed', now_ms}.
-- Usage (admit mode only): HINCRBY requests, or refused:<reason> for a refusal. An admitted
-- request counted in usage always has an entry in the first subject's reservations hash (0
-- when it reserved no tokens), so quota_finish.lua adds its tokens to the usage once.
-- Returns {admitted, refusing subject (1-based, 0 = none), reason, now_ms, then 8 figures per
-- subject: minute count, oldest in minute window, day count, oldest in day window, tokens used,
-- live streams, earliest lease expiry, pictures of the day}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = ARGV[1]
local reserve = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[3])
local day_left = tonumber(ARGV[4])
local admit = ARGV[5] == 'admit'
local n = tonumber(ARGV[6])
local checked = ARGV[7] == '1'
local usage_user = ARGV[8]
local usage_ttl = tonumber(ARGV[9])
local images = tonumber(ARGV[10])
local K = 7   -- KEYS per subject
local L = 11  -- first limit in ARGV
local N = 5   -- limits per subject
local MINUTE = 60000
local DAY = 86400000

if checked then
  local rec = redis.call('HMGET', KEYS[n * K + 1], 'user_id', 'tier', 'key_id')
  local base = L + n * N
  local tier = rec[1] and (redis.call('HGET', KEYS[n * K + 2], 'tier') or rec[2])
  if not rec[1] or rec[1] ~= ARGV[base] or tier ~= ARGV[base + 1] or rec[3] ~= ARGV[base + 2] then
    return {0, 0, 'identity_changed', now}
  end
end

local function oldest(key)
  local r = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if r[2] then return tonumber(r[2]) end
  return 0
end

local figures = {}
local refusing = 0
local reason = ''
local function refund_expired(tok_key, str_key, res_key, own_key)
  -- Only the counted subject's own leases: another model's expired lease in the shared
  -- stream zset is refunded (from its own counter) by that model's next call.
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', own_key, '-inf', now)) do
    local held = tonumber(redis.call('HGET', res_key, dead) or '0')
    if held > 0 then
      -- Marked, not deleted: the late finish of a merely stalled request charges what it used.
      redis.call('HSET', res_key, dead, -1)
      redis.call('HINCRBY', res_key, 'refunded', held)
      if redis.call('EXISTS', tok_key) == 1 then
        local left = redis.call('DECRBY', tok_key, held)
        if left < 0 then redis.call('SET', tok_key, 0, 'KEEPTTL') end
      end
    end
  end
  redis.call('ZREMRANGEBYSCORE', own_key, '-inf', now)
  if own_key ~= str_key then redis.call('ZREMRANGEBYSCORE', str_key, '-inf', now) end
end

for i = 0, n - 1 do
  local rpm_key, rpd_key, tok_key, str_key = KEYS[i*K+1], KEYS[i*K+2], KEYS[i*K+3], KEYS[i*K+4]
  local rpm, rpd = tonumber(ARGV[L+i*N]), tonumber(ARGV[L+1+i*N])
  local tok, streams = tonumber(ARGV[L+2+i*N]), tonumber(ARGV[L+3+i*N])
  local ipd = tonumber(ARGV[L+4+i*N])
  redis.call('ZREMRANGEBYSCORE', rpm_key, '-inf', now - MINUTE)
  redis.call('ZREMRANGEBYSCORE', rpd_key, '-inf', now - DAY)
  refund_expired(tok_key, str_key, KEYS[i*K+5], KEYS[i*K+6])
  local f = {
    redis.call('ZCARD', rpm_key), 0,
    redis.call('ZCARD', rpd_key), 0,
    tonumber(redis.call('GET', tok_key) or '0'),
    redis.call('ZCARD', str_key), 0,
    tonumber(redis.call('GET', KEYS[i*K+7]) or '0'),
  }
  if refusing == 0 and admit then
    if rpm > 0 and f[1] >= rpm then
      refusing, reason = i + 1, 'requests_per_minute'
    elseif rpd > 0 and f[3] >= rpd then
      refusing, reason = i + 1, 'requests_per_day'
    elseif tok > 0 and f[5] + reserve > tok then
      refusing, reason = i + 1, 'tokens_per_day'
    elseif ipd > 0 and images > 0 and f[8] + images > ipd then
      refusing, reason = i + 1, 'images_per_day'
    elseif streams > 0 and f[6] >= streams then
      refusing, reason = i + 1, 'concurrent_streams'
    end
  end
  figures[i + 1] = f
end

local counted = admit and usage_user ~= ''
if admit and refusing == 0 then
  for i = 0, n - 1 do
    local rpm_key, rpd_key, tok_key, str_key = KEYS[i*K+1], KEYS[i*K+2], KEYS[i*K+3], KEYS[i*K+4]
    local res_key, own_key = KEYS[i*K+5], KEYS[i*K+6]
    local rpm, rpd = tonumber(ARGV[L+i*N]), tonumber(ARGV[L+1+i*N])
    local tok, streams = tonumber(ARGV[L+2+i*N]), tonumber(ARGV[L+3+i*N])
    local ipd = tonumber(ARGV[L+4+i*N])
    local f = figures[i + 1]
    if rpm > 0 then
      redis.call('ZADD', rpm_key, now, lease)
      redis.call('PEXPIRE', rpm_key, MINUTE + 1000)
      f[1] = f[1] + 1
    end
    if rpd > 0 then
      redis.call('ZADD', rpd_key, now, lease)
      redis.call('PEXPIRE', rpd_key, DAY + 1000)
      f[3] = f[3] + 1
    end
    if tok > 0 then
      redis.call('INCRBY', tok_key, reserve)
      redis.call('PEXPIRE', tok_key, day_left + DAY)
      f[5] = f[5] + reserve
      redis.call('HSET', res_key, lease, reserve)
      redis.call('HINCRBY', res_key, 'admitted', reserve)
      redis.call('PEXPIRE', res_key, day_left + DAY)
    elseif i == 0 and counted then
      -- Nothing reserved, but the finish must still know it is the first (see the header).
      redis.call('HSET', res_key, lease, 0)
      redis.call('PEXPIRE', res_key, day_left + DAY)
    end
    if streams > 0 or (tok > 0 and own_key == str_key) then
      redis.call('ZADD', str_key, now + lease_ms, lease)
      redis.call('PEXPIRE', str_key, lease_ms * 2)
      f[6] = f[6] + 1
    end
    if ipd > 0 and images > 0 then
      redis.call('INCRBY', KEYS[i*K+7], images)
      redis.call('PEXPIRE', KEYS[i*K+7], day_left + DAY)
      f[8] = f[8] + images
    end
    if tok > 0 and own_key ~= str_key then
      redis.call('ZADD', own_key, now + lease_ms, lease)
      redis.call('PEXPIRE', own_key, lease_ms * 2)
    end
  end
end

if counted then
  local u = n * K + (checked and 2 or 0)
  local usage, users = KEYS[u + 1], KEYS[u + 2]
  local field = refusing == 0 and 'requests' or ('refused:' .. reason)
  -- The user's first record of the day lists them and bounds both keys; later ones only count.
  local first = redis.call('EXISTS', usage) == 0
  redis.call('HINCRBY', usage, field, 1)
  if first then
    redis.call('EXPIRE', usage, usage_ttl)
    redis.call('SADD', users, usage_user)
    redis.call('EXPIRE', users, usage_ttl)
  end
end

local out = {refusing == 0 and admit and 1 or 0, refusing, reason, now}
for i = 1, n do
  local rpm_key, rpd_key, str_key = KEYS[(i-1)*K+1], KEYS[(i-1)*K+2], KEYS[(i-1)*K+4]
  local f = figures[i]
  f[2] = oldest(rpm_key)
  f[4] = oldest(rpd_key)
  f[7] = oldest(str_key)
  for j = 1, 8 do out[#out + 1] = f[j] end
end
return out
