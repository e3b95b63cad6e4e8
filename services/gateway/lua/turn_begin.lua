-- Start a turn: the session must exist and belong to ARGV[1], and no other turn may be
-- running. KEYS: meta, turn lock. ARGV: owner, lock token, lock ms.
-- Returns 1 (started), 0 (not found / not the owner), -1 (a turn is in progress).
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return -1
end
return 1
