-- End of a request: release its stream lease, settle its token reservation, and add the
-- tokens it used to the user's usage of the day; all of it once, so retrying is safe.
-- KEYS: 4 per subject: tokens-of-the-day counter, stream-lease zset, the day's reservations
--       hash, the counted lease zset (see quota_admit.lua); then, optionally, the user's usage
--       hash of the day.
-- ARGV[1] lease id, ARGV[2] tokens to refund (reserved - used), ARGV[3] number of subjects,
-- ARGV[4] prompt tokens, ARGV[5] completion tokens, ARGV[6] 1 = return the counters.
-- A reservation still held (> 0): refund the unused part. Marked -1: the lease expired
-- unrenewed (its gateway stalled past the lease) and quota_admit.lua refunded all of it:
-- charge what was used. Absent: settled already (a retried call) or no token limit: nothing
-- to do. So the counter ends exact whichever way. The usage gets the tokens only from the
-- call that finds the lease in the first subject's hash (admission put it there), so once.
-- Returns each subject's tokens-of-the-day counter after settling when asked (budget alerts
-- read it), else nothing.
local refund = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local prompt, completion = tonumber(ARGV[4]), tonumber(ARGV[5])
local used = prompt + completion
local want = ARGV[6] == '1'
local counters = {}
local first_settle = false
for i = 1, n * 4, 4 do
  local tok_key, str_key, res_key, own_key = KEYS[i], KEYS[i + 1], KEYS[i + 2], KEYS[i + 3]
  redis.call('ZREM', str_key, ARGV[1])
  if own_key ~= str_key then redis.call('ZREM', own_key, ARGV[1]) end
  local held = tonumber(redis.call('HGET', res_key, ARGV[1]) or '0')
  local had = redis.call('HDEL', res_key, ARGV[1]) == 1
  if i == 1 then first_settle = had end
  local left = nil
  -- The counter may have expired (day over): never resurrect it as a negative number.
  if held ~= 0 and redis.call('EXISTS', tok_key) == 1 then
    if held > 0 and refund > 0 then
      left = redis.call('DECRBY', tok_key, refund)
      if left < 0 then
        redis.call('SET', tok_key, 0, 'KEEPTTL')
        left = 0
      end
      redis.call('HINCRBY', res_key, 'refunded', refund)
    elseif held < 0 and used > 0 then
      left = redis.call('INCRBY', tok_key, used)
      redis.call('HINCRBY', res_key, 'refunded', -used)  -- net of the earlier full refund
    end
  end
  if want then
    counters[#counters + 1] = left or tonumber(redis.call('GET', tok_key) or '0')
  end
end
-- Only into the hash admission made (it set the TTL): a hash gone meanwhile stays gone.
local usage = KEYS[n * 4 + 1]
if usage and first_settle and redis.call('EXISTS', usage) == 1 then
  redis.call('HINCRBY', usage, 'prompt_tokens', prompt)
  redis.call('HINCRBY', usage, 'completion_tokens', completion)
end
return counters
