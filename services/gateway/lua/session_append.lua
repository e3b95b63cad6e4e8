-- Append one message to a session owned by ARGV[1], refresh its TTL and its place in the
-- owner's index; all or nothing.
-- KEYS: meta hash, message list, owner's index zset.
-- ARGV: owner, message json, now ms, ttl s, title to set if the session has none, session id.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
local ttl = tonumber(ARGV[4])
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
if ARGV[5] ~= '' and (redis.call('HGET', KEYS[1], 'title') or '') == '' then
  redis.call('HSET', KEYS[1], 'title', ARGV[5])
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[6])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return 1
