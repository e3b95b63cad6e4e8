-- Release (ARGV[2] == '0') or extend (ARGV[2] = ms) a turn lock held with token ARGV[1].
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
