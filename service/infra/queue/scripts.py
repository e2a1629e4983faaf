"""The queue's Lua scripts: each a read-then-write that must not interleave with another client's,
run atomically by Redis (Redis docs, "Scripting with Lua": a script blocks the server while it runs).

De-duplication is two-phase: a key is "claimed" while its work is being queued and "queued" once it
is. A repeat that finds "queued" is a duplicate (200, nothing done); one that finds "claimed" is a
concurrent delivery of the same event and is told to come back (503), because the first may yet
fail; a failed enqueue deletes its claims so the server's retry is not mistaken for a duplicate.
"""

from __future__ import annotations

# What must happen before a task is sent, in one round trip (one fsync under appendfsync always).
# KEYS: the dedup keys (ARGV[1] of them), then, when a patient is given, its marker and focus set.
# ARGV: n, claim ttl, dedup ttl, token ('' = no patient), pending ttl, focus refs...
# Returns {dedup state: new | duplicate | busy, the patient's marker: claimed | coalesced | busy | ''}.
CLAIM = """
local n = tonumber(ARGV[1])
local state = 'new'
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  if v == 'queued' then state = 'duplicate'
  elseif v and state == 'new' then state = 'busy' end
end
if state == 'new' then
  for i = 1, n do redis.call('SET', KEYS[i], 'claimed', 'EX', ARGV[2]) end
elseif state == 'duplicate' then
  for i = 1, n do redis.call('SET', KEYS[i], 'queued', 'EX', ARGV[3], 'NX') end
end
if state ~= 'new' or ARGV[4] == '' then return {state, ''} end
local marker, focus = KEYS[n + 1], KEYS[n + 2]
local pending = redis.call('GET', marker)
if pending and pending ~= 'queued' then return {state, 'busy'} end
if not pending then redis.call('SET', marker, 'claimed:' .. ARGV[4], 'EX', ARGV[5]) end
if #ARGV > 5 then
  redis.call('SADD', focus, unpack(ARGV, 6))
  redis.call('EXPIRE', focus, ARGV[5])
end
if pending then return {state, 'coalesced'} end
return {state, 'claimed'}
"""

# Set the marker to "queued" only if it is still our claim: had the task already started (and
# deleted the marker), a new "queued" marker would swallow later events. The patient also goes into
# the pending-due index (KEYS[2], score: when the task is due, ms), so a task the broker lost can be
# found and sent again (recover_pending).
PENDING_QUEUED = """
if redis.call('GET', KEYS[1]) == 'claimed:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'queued', 'EX', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""

PENDING_RELEASE = """
if redis.call('GET', KEYS[1]) == 'claimed:' .. ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: subscription hash, set of subscriptions. ARGV: highest number in this notification (-1:
# none), now, field to stamp, status ('' to keep), subscription reference.
ADVANCE = """
local prev = redis.call('HGET', KEYS[1], 'highest')
local top = tonumber(ARGV[1])
if top >= 0 and (not prev or top > tonumber(prev)) then redis.call('HSET', KEYS[1], 'highest', top) end
redis.call('HSET', KEYS[1], 'last_seen_at', ARGV[2], ARGV[3], ARGV[2], 'kind', 'backport')
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'status', ARGV[4]) end
redis.call('SADD', KEYS[2], ARGV[5])
return prev
"""
