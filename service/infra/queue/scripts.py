"""The queue's Lua scripts: each a read-then-write that must not interleave with another client's,
run atomically by Redis (Redis docs, "Scripting with Lua": a script blocks the server while it runs).

De-duplication is two-phase: a key is "claimed" while its work is being queued and "queued" once it
is. A repeat that finds "queued" is a duplicate (200, nothing done); one that finds "claimed" is a
concurrent delivery of the same event and is told to come back (503), because the first may yet
fail; a failed enqueue deletes its claims so the server's retry is not mistaken for a duplicate.
"""

from __future__ import annotations

# What must happen before a task is sent, in one round trip (one fsync under appendfsync always).
# KEYS: the dedup keys (ARGV[1] of them), then, when a patient is given, its marker, its focus set
# and the pending-due index.
# ARGV: n, claim ttl, dedup ttl, token ('' = no patient), pending ttl, due (ms), patient, focus refs...
# Returns {dedup state: new | duplicate | busy, the patient's marker: claimed | coalesced | ''}.
#
# The patient's marker: absent (nothing queued), "claimed:<token>" (a delivery is queueing the
# evaluation right now), "joined:<token>" (the same, and later events have coalesced into it),
# "queued" (sent, not started). A later event coalesces into any of the three: the evaluation has
# not started, so it reads the record after this event. It used to be told "busy" while the marker
# was claimed and to queue its own evaluation after ~90 ms of waiting; a first delivery slower than
# that (a loaded API, a broker round trip) gave two evaluations for two same-millisecond events.
# The claim goes into the pending-due index at once, so an evaluation that was joined and then never
# sent (the claimer failed or died) is found and sent by recover_pending: joining never loses one.
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
local marker, focus, due = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
local pending = redis.call('GET', marker)
if not pending then
  redis.call('SET', marker, 'claimed:' .. ARGV[4], 'EX', ARGV[5])
  redis.call('ZADD', due, ARGV[6], ARGV[7])
else
  if string.sub(pending, 1, 8) == 'claimed:' then
    redis.call('SET', marker, 'joined:' .. string.sub(pending, 9), 'EX', ARGV[5])
  end
  redis.call('ZADD', due, 'NX', ARGV[6], ARGV[7])  -- an owed evaluation is always in the index
end
if #ARGV > 7 then
  redis.call('SADD', focus, unpack(ARGV, 8))
  redis.call('EXPIRE', focus, ARGV[5])
end
if pending then return {state, 'coalesced'} end
return {state, 'claimed'}
"""

# Set the marker to "queued" only if it is still our claim (joined or not): had the task already
# started (and deleted the marker), a new "queued" marker would swallow later events. The patient's
# due time in the pending-due index (KEYS[2], score: ms) is updated, so a task the broker lost can be
# found and sent again (recover_pending).
# KEYS: marker, pending-due. ARGV: token, pending ttl, due (ms), patient.
PENDING_QUEUED = """
local v = redis.call('GET', KEYS[1])
if v == 'claimed:' .. ARGV[1] or v == 'joined:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'queued', 'EX', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""

# Our send failed. Nobody joined: the claim goes (deleting a marker never loses an event: the
# next one queues anew). Someone joined (and was answered 200): the evaluation is owed, so the
# marker stays as "queued" and its entry in the pending-due index makes recover_pending send it.
# KEYS: marker, pending-due. ARGV: token, pending ttl, patient.
PENDING_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v == 'claimed:' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 0
elseif v == 'joined:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'queued', 'EX', ARGV[2])
  return 1
end
return 0
"""

# recover_pending, one late patient: an evaluation is owed if the marker is "queued" (sent, perhaps
# lost by the broker) or "joined:*" (its claimer failed or died after others coalesced into it); it
# is marked "queued" with a new due time before being sent again. No marker (started meanwhile) or a
# stale "claimed:*" (a request that died with nobody relying on it; its notifier retries): the
# patient leaves the index. KEYS: marker, pending-due. ARGV: pending ttl, new due (ms), patient.
PENDING_RECOVER = """
local v = redis.call('GET', KEYS[1])
if v == 'queued' or (v and string.sub(v, 1, 7) == 'joined:') then
  redis.call('SET', KEYS[1], 'queued', 'EX', ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
redis.call('ZREM', KEYS[2], ARGV[3])
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
if ARGV[4] == 'requested' then redis.call('HSETNX', KEYS[1], 'requested_since', ARGV[2])
elseif ARGV[4] ~= '' then redis.call('HDEL', KEYS[1], 'requested_since') end
redis.call('SADD', KEYS[2], ARGV[5])
return prev
"""
