-- End of a request: release its stream lease, refund the unused token reservation, and add
-- the tokens it used to the user's usage of the day.
-- KEYS: 2 per subject: tokens-of-the-day counter, stream-lease zset; then, optionally, the
-- user's usage hash of the day.
-- ARGV[1] lease id, ARGV[2] tokens to refund, ARGV[3] number of subjects, ARGV[4] prompt
-- tokens, ARGV[5] completion tokens, ARGV[6] 1 = return the counters.
-- Returns each subject's tokens-of-the-day counter after the refund when asked (budget alerts
-- read it), else nothing.
local refund = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local want = ARGV[6] == '1'
local used = {}
for i = 1, n * 2, 2 do
  redis.call('ZREM', KEYS[i + 1], ARGV[1])
  local left = nil
  -- The counter may have expired (day over): never resurrect it as a negative number.
  if refund > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    left = redis.call('DECRBY', KEYS[i], refund)
    if left < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
      left = 0
    end
  end
  if want then
    used[#used + 1] = left or tonumber(redis.call('GET', KEYS[i]) or '0')
  end
end
-- Only into the hash admission made (it set the TTL): a hash gone meanwhile stays gone.
local usage = KEYS[n * 2 + 1]
if usage and redis.call('EXISTS', usage) == 1 then
  redis.call('HINCRBY', usage, 'prompt_tokens', tonumber(ARGV[4]))
  redis.call('HINCRBY', usage, 'completion_tokens', tonumber(ARGV[5]))
end
return used
