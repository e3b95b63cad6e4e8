-- End of a request: release its stream lease, refund the unused token reservation, and add
-- the tokens it used to the user's usage of the day.
-- KEYS: 2 per subject: tokens-of-the-day counter, stream-lease zset; then, optionally, the
-- user's usage hash of the day.
-- ARGV[1] lease id, ARGV[2] tokens to refund, ARGV[3] number of subjects, ARGV[4] prompt
-- tokens, ARGV[5] completion tokens, ARGV[6] usage hash TTL in seconds.
-- Returns each subject's tokens-of-the-day counter after the refund (budget alerts read it).
local refund = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local used = {}
for i = 1, n * 2, 2 do
  redis.call('ZREM', KEYS[i + 1], ARGV[1])
  -- The counter may have expired (day over): never resurrect it as a negative number.
  if refund > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    local left = redis.call('DECRBY', KEYS[i], refund)
    if left < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
  used[#used + 1] = tonumber(redis.call('GET', KEYS[i]) or '0')
end
if #KEYS > n * 2 then
  local usage = KEYS[n * 2 + 1]
  redis.call('HINCRBY', usage, 'prompt_tokens', tonumber(ARGV[4]))
  redis.call('HINCRBY', usage, 'completion_tokens', tonumber(ARGV[5]))
  redis.call('EXPIRE', usage, tonumber(ARGV[6]))
end
return used
