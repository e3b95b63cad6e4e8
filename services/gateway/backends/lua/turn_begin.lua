-- Start a turn: the session must exist and belong to ARGV[1], have room for two more messages
-- (the user's and the reply), for ARGV[6] more bytes of text and ARGV[8] more bytes of
-- pictures, and no other turn may be running.
-- KEYS: meta, turn lock, message list.
-- ARGV: owner, lock token, lock ms, max messages (0 = no cap), max bytes (0 = no cap),
--       bytes of the user's message, max picture bytes (0 = no cap), bytes of its pictures.
-- Returns 1 (started), 0 (not found / not the owner), -1 (a turn is in progress),
-- -2 (the session is at its message cap), -3 (the session is at its byte cap), -4 (the
-- session is at its picture-byte cap).
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
local max_messages, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
if max_messages > 0 and redis.call('LLEN', KEYS[3]) + 2 > max_messages then
  return -2
end
local stored = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
if max_bytes > 0 and stored + tonumber(ARGV[6]) > max_bytes then
  return -3
end
local max_image_bytes, image_bytes = tonumber(ARGV[7] or '0'), tonumber(ARGV[8] or '0')
if max_image_bytes > 0 and image_bytes > 0 then
  local stored_images = tonumber(redis.call('HGET', KEYS[1], 'image_bytes') or '0')
  if stored_images + image_bytes > max_image_bytes then
    return -4
  end
end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return -1
end
return 1
