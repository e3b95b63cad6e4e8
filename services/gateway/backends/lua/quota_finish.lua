-- End of a request: release its stream lease and refund the unused token reservation.
-- KEYS: 2 per subject: tokens-of-the-day counter, stream-lease zset.
-- ARGV[1] lease id, ARGV[2] tokens to refund.
local refund = tonumber(ARGV[2])
for i = 1, #KEYS, 2 do
  redis.call('ZREM', KEYS[i + 1], ARGV[1])
  -- The counter may have expired (day over): never resurrect it as a negative number.
  if refund > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    local left = redis.call('DECRBY', KEYS[i], refund)
    if left < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 1
