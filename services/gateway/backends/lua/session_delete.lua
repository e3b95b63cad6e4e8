-- Delete a session if ARGV[1] owns it. KEYS: meta, messages, turn lock, owner's index, images.
-- ARGV: owner, session id. Returns 1 when deleted, 0 when not found / not the owner.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
