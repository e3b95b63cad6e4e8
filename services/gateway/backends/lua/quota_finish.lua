-- End of a request: release its stream lease and settle its token reservation, once.
-- KEYS: 3 per subject: tokens-of-the-day counter, stream-lease zset, the day's reservations
--       hash (see quota_admit.lua).
-- ARGV[1] lease id, ARGV[2] tokens to refund (reserved - used), ARGV[3] tokens used.
-- A reservation still held (> 0): refund the unused part. Marked -1: the lease expired
-- unrenewed (its gateway stalled past the lease) and quota_admit.lua refunded all of it:
-- charge what was used. Absent: settled already (a retried call) or no token limit: nothing
-- to do. So the counter ends exact whichever way, and retrying this call is safe.
local refund, used = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, #KEYS, 3 do
  redis.call('ZREM', KEYS[i + 1], ARGV[1])
  local held = tonumber(redis.call('HGET', KEYS[i + 2], ARGV[1]) or '0')
  redis.call('HDEL', KEYS[i + 2], ARGV[1])
  -- The counter may have expired (day over): never resurrect it as a negative number.
  if held ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    if held > 0 and refund > 0 then
      local left = redis.call('DECRBY', KEYS[i], refund)
      if left < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
      redis.call('HINCRBY', KEYS[i + 2], 'refunded', refund)
    elseif held < 0 and used > 0 then
      redis.call('INCRBY', KEYS[i], used)
      redis.call('HINCRBY', KEYS[i + 2], 'refunded', -used)  -- net of the earlier full refund
    end
  end
end
return 1
