-- Store messages of one finished turn in a session owned by ARGV[1] (the user's message and
-- the reply together, so a failed turn leaves nothing behind), refresh the TTL and the
-- session's place in the owner's index; all or nothing.
-- KEYS: meta hash, message list, owner's index zset.
-- ARGV: owner, now ms, ttl s, title to set if the session has none, session id, bytes of the
--       messages' contents, then one JSON message per argument.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
local ttl = tonumber(ARGV[3])
for i = 7, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[6])
if ARGV[4] ~= '' and (redis.call('HGET', KEYS[1], 'title') or '') == '' then
  redis.call('HSET', KEYS[1], 'title', ARGV[4])
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return 1
