-- Extend a live stream's lease. KEYS: stream-lease zsets; ARGV[1] lease id, ARGV[2] lease ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[2])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + ms, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], ms * 2)
end
return 1
