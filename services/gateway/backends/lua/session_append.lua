-- Store messages of one finished turn in a session owned by ARGV[1] (the user's message and
-- the reply together, so a failed turn leaves nothing behind), refresh the TTL and the
-- session's place in the owner's index; all or nothing.
-- A retried turn (same Idempotency-Key) whose earlier attempt stored a partial reply replaces
-- it: ARGV[7] >= 0 is the index of that attempt's user message, which must have id ARGV[8];
-- it and everything after it are removed first (and their bytes uncounted). Safe to retry.
-- Pictures go into the session's image hash, once per picture id (the same picture sent
-- twice is stored and counted once); the meta hash's `image_bytes` counts their sizes. A
-- replaced attempt's pictures stay (a retry usually sends the same ones).
-- KEYS: meta hash, message list, owner's index zset, image hash.
-- ARGV: owner, now ms, ttl s, title to set if the session has none, session id, bytes of the
--       messages' contents, index to replace from (-1 = append), id expected there, number of
--       pictures k, then k triples (id, base64 bytes, size), then one JSON message per
--       argument.
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
local k = tonumber(ARGV[9])
local image_bytes = 0
for i = 10, 9 + 3 * k, 3 do
  if redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1]) == 1 then
    image_bytes = image_bytes + tonumber(ARGV[i + 2])
  end
end
for i = 10 + 3 * k, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
if image_bytes > 0 then
  redis.call('HINCRBY', KEYS[1], 'image_bytes', image_bytes)
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
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('EXPIRE', KEYS[4], ttl)
end
return 1
