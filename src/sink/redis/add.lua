-- Adds one event's entries to their streams, at most once per event and route.
--
-- KEYS[1]   the record that the event was added (its value: the ids of the entries)
-- KEYS[2..] one stream key per entry
-- ARGV[1]   how long the record is kept, in milliseconds
-- ARGV[2]   MAXLEN, or 0 for no trimming
-- ARGV[3]   "~" (approximate) or "=" (exact) trimming
-- ARGV[4..] per entry: the number of fields n, then n names and values, alternating
--
-- Returns {1, ids} when it added the entries, {0, ids} when the record says they were added
-- before. Every key is checked before the first write, so an error leaves nothing half done: a
-- script is atomic, but Redis does not undo the writes of a script that fails midway.
local seen = redis.call('GET', KEYS[1])
if seen then
  return {0, seen}
end
for i = 2, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE the key ' .. KEYS[i] .. ' holds a ' .. kind ..
      ', not a stream')
  end
end
local maxlen = tonumber(ARGV[2])
local at = 4
local ids = {}
for i = 2, #KEYS do
  local n = tonumber(ARGV[at])
  local args = {'XADD', KEYS[i]}
  if maxlen > 0 then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = ARGV[3]
    args[#args + 1] = ARGV[2]
  end
  args[#args + 1] = '*'
  for j = at + 1, at + 2 * n do
    args[#args + 1] = ARGV[j]
  end
  at = at + 2 * n + 1
  ids[#ids + 1] = redis.call(unpack(args))
end
local added = table.concat(ids, ' ')
redis.call('SET', KEYS[1], added, 'PX', ARGV[1])
return {1, added}
