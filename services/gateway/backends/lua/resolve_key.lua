-- Resolve an API key digest in one round trip.
-- KEYS[1] = apikey:<sha256>; ARGV[1] = key prefix (to find the user's tier override)
-- Returns {user_id, tier, key_id} or false when the key is unknown/revoked.
local rec = redis.call('HMGET', KEYS[1], 'user_id', 'tier', 'key_id')
if not rec[1] then
  return false
end
local user_tier = redis.call('HGET', ARGV[1] .. 'user:' .. rec[1], 'tier')
if user_tier then
  rec[2] = user_tier
end
return rec
