-- Create a session owned by ARGV[1], keeping at most ARGV[8] sessions per owner (0 = no cap).
-- At the cap, the owner's least recently updated sessions are deleted first, in this same
-- atomic step, so concurrent creates can never leave the owner with more than the cap.
-- KEYS: the new session's meta hash, the owner's index zset (member = id, score = updated ms).
-- ARGV: owner, session id, now ms, ttl s, title, system prompt, stored bytes, max sessions,
--       key prefix (to name an evicted session's keys).
-- Returns the number of sessions deleted to make room.
local owner, ttl, max = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[8])
local evicted = 0
if max > 0 then
  while redis.call('ZCARD', KEYS[2]) >= max do
    local oldest = redis.call('ZPOPMIN', KEYS[2])
    local base = ARGV[9] .. 'sess:' .. oldest[1]
    -- The index only ever holds the owner's ids; checked anyway, as delete does.
    if redis.call('HGET', base, 'owner') == owner then
      redis.call('DEL', base, base .. ':msgs', base .. ':turn', base .. ':imgs')
    end
    evicted = evicted + 1
  end
end
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'owner', owner, 'title', ARGV[5],
  'system_prompt', ARGV[6], 'created_at', ARGV[3], 'updated_at', ARGV[3], 'bytes', ARGV[7])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[2], ttl)
return evicted
