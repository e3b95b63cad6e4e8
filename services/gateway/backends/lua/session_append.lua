-- Store messages of one finished turn in a session owned by ARGV[1] (the user's message and
-- the reply together, so a failed turn leaves nothing behind), refresh the TTL and the
-- session's place in the owner's index; all or nothing.
-- A retried turn (same Idempotency-Key) whose earlier attempt stored a partial reply replaces
-- it: ARGV[7] >= 0 is the index of that attempt's user message, which must have id ARGV[8];
-- it and everything after it are removed first (and their bytes uncounted). Safe to retry.
-- KEYS: meta hash, message list, owner's index zset.
-- ARGV: owner, now ms, ttl s, title to set if the session has none, session id, bytes of the
--       messages' contents, index to replace from (-1 = append), id expected there, then one
--       JSON message per argument.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
-- Already stored (a retried call whose first try reached Redis): nothing to do.
local last = redis.call('LINDEX', KEYS[2], -1)
if last and cjson.decode(last)['id'] == cjson.decode(ARGV[#ARGV])['id'] then
  return 1
end
local ttl = tonumber(ARGV[3])
local from = tonumber(ARGV[7])
local added = tonumber(ARGV[6])
if from >= 0 then
  local first = redis.call('LINDEX', KEYS[2], from)
  if not first or cjson.decode(first)['id'] ~= ARGV[8] then
    return 0
  end
  local removed = 0
  for _, raw in ipairs(redis.call('LRANGE', KEYS[2], from, -1)) do
    removed = removed + #cjson.decode(raw)['content']
  end
  if from == 0 then
    redis.call('DEL', KEYS[2])
  else
    redis.call('LTRIM', KEYS[2], 0, from - 1)
  end
  added = added - removed
end
for i = 9, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'bytes', added)
if ARGV[4] ~= '' and (redis.call('HGET', KEYS[1], 'title') or '') == '' then
  redis.call('HSET', KEYS[1], 'title', ARGV[4])
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return 1
