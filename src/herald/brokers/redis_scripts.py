"""The Lua scripts that keep a channel's stream in Redis, and the keys they use.

Keys (``prefix`` defaults to ``herald``; ``CHANNEL`` is the Herald channel name, ``B``
its epoch bucket, ``crc32(CHANNEL) % 16384``):

=================================  ==========  ===================================================
key                                type        contents
=================================  ==========  ===================================================
``PREFIX:meta:{bB}:CHANNEL``       hash        ``e`` = epoch, ``o`` = offset of the newest
                                               publication, ``r`` = Redis run id of the last
                                               write, ``d`` = '1' when that run kept every
                                               acknowledged write
``PREFIX:stream:{bB}:CHANNEL``     stream      the last ``history_size`` publications; entry id
                                               ``OFFSET-0``, fields ``d`` data, ``i`` info, ``x``
                                               expiry (ms since the Unix epoch, 0 = never)
``PREFIX:presence:{bB}:CHANNEL``   hash        client id -> ClientInfo JSON (presence/redis.py)
``PREFIX:presence-exp:{bB}:CHANNEL`` sorted set client id -> expiry (ms)
``PREFIX:epochs:{bB}``             hash        ``i`` = a random incarnation of this data set,
                                               ``g`` = streams created in the bucket (one key
                                               per bucket: at most 16384 in all)
``PREFIX:idem:{bB}:N:CHANNEL:KEY`` string      ``OFFSET:EPOCH`` of the publication made with
                                               idempotency key ``KEY`` (``N`` = len(CHANNEL), so
                                               no channel and key pair names another's key);
                                               expires ``idempotency_window`` after it
=================================  ==========  ===================================================

Pub/Sub channel ``PREFIX:ch:{bB}:CHANNEL`` carries the channel's envelopes.

``{bB}`` is a Redis Cluster hash tag: every key and the Pub/Sub channel of a channel,
and its bucket's ``epochs`` hash, are in one slot, so each script touches one slot
(a Redis Cluster runs it on the master that owns it, and its sharded ``SPUBLISH``
reaches only the nodes subscribed there).  One layout for one Redis and a cluster.
Before issue 16 the keys had no tag (``PREFIX:meta:CHANNEL``, one ``PREFIX:epochs``
hash): streams from before an upgrade are not read and start again in a new epoch,
which recovery reports (``recovered: false``).

Both history keys expire ``history_ttl`` seconds after the last publication;
the meta key of a namespace without history expires ``stream_meta_ttl`` seconds
after it.  Only a publish writes a channel's keys.  A channel without a meta key
(never published to, TTL expired, Redis restarted without persistence,
``remove_history``) reads as offset 0 in its *empty epoch*, and nothing is stored
for the read, so clients cannot fill Redis by naming channels.  The next publish
starts the stream at offset 1 in that same epoch, so a subscriber told ``(0,
epoch)`` simply continues.  The empty epoch is computed, not stored per channel:
from the Redis ``run_id`` (a restart, a promoted replica or a restored snapshot
never reproduces it), a random incarnation kept in the bucket's ``PREFIX:epochs:{bB}`` (a
FLUSHALL does not reproduce it either) and the generation of the channel's bucket
in that hash, which every stream creation in the bucket increments.  So
once a channel's stream was created (and perhaps lost), the channel never reads
as an earlier empty epoch again, and a client holding ``(0, old epoch)`` is told
``recovered: false`` instead of silently missing that stream.

Rollback guard (:data:`RUN_CHECK`, run first by every channel script): a meta key
stamped (``r``) with another Redis run id than the current one was last written
before Redis (re)started; it is kept only when the run that wrote it and the
current run both keep every acknowledged write (see
:meth:`~herald.brokers.redis.RedisBroker._check_run`), and otherwise dropped, so
the stream starts again in a new epoch whichever node touches it first.
"""

from __future__ import annotations

from .base import EPOCH_BUCKETS, epoch_bucket


def bucket_tag(channel: str) -> str:
    """``{bB}``: the hash tag of ``channel``'s keys (``B`` its epoch bucket; module docstring)."""
    return f"{{b{epoch_bucket(channel)}}}"


# Lua scripts run atomically: nothing else touches a channel's keys between the
# epoch check, the offset increment, the append and the PUBLISH.

# Rollback guard, run first by every script that reads or writes a channel's keys.  The
# last two ARGV are the Redis run id the calling node checked and '1' when that run keeps
# every acknowledged write (see ``RedisBroker._check_run``).  A run id changes on every
# Redis start and differs on a promoted replica, and no snapshot or replica can bring a
# future one back: a stream whose meta key is stamped with another run id (field ``r``)
# was last written before Redis (re)started, and may have been rolled back.  It is kept
# only when the run that wrote it and the current run both keep every acknowledged write
# (field ``d``); otherwise it is dropped here and the script continues as for a lost
# stream: a new epoch, offsets from 1.  ``{-1, run}``: the node must check this run first.
RUN_CHECK = """
local run = string.match(redis.call('info', 'server'), 'run_id:(%x+)')
if ARGV[#ARGV - 1] ~= run then return {-1, run} end
local durable = ARGV[#ARGV]
if redis.call('hget', KEYS[2], 'r') ~= run and redis.call('hexists', KEYS[2], 'e') == 1 then
  if durable == '1' and redis.call('hget', KEYS[2], 'd') == '1' then
    redis.call('hset', KEYS[2], 'r', run)
  else
    redis.call('del', KEYS[1], KEYS[2])
  end
end
"""

# The epoch a channel without a stream reads as, and its next stream starts in (module
# docstring).  ``epochs`` is KEYS[3] (PREFIX:epochs:{bB}, the channel's bucket),
# ``fresh`` a random token (the incarnation when the hash is new).  Always composed after
# :data:`RUN_CHECK`, whose ``run`` (the current run id) it reuses: one INFO per script run.
EMPTY_EPOCH = """
local function empty_epoch(epochs, fresh)
  local incarnation = redis.call('hget', epochs, 'i')
  if not incarnation then
    incarnation = fresh
    redis.call('hset', epochs, 'i', incarnation)
  end
  local generation = redis.call('hget', epochs, 'g') or '0'
  return string.sub(redis.sha1hex(run .. incarnation), 1, 8) .. '.' .. generation
end
"""

_PUBLISH_BODY = """
local stream, meta = KEYS[1], KEYS[2]
local pubsub, data, info = ARGV[1], ARGV[2], ARGV[3]
local size, ttl, meta_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[7])
local epoch = redis.call('hget', meta, 'e')
if not epoch then
  -- No stream (never published, expired, flushed, Redis restarted empty): start one in
  -- the empty epoch readers were told; later streams of this bucket get another one.
  epoch = empty_epoch(KEYS[3], ARGV[6])
  redis.call('hincrby', KEYS[3], 'g', 1)
  redis.call('del', stream)
  redis.call('hset', meta, 'e', epoch)
end
local offset = redis.call('hincrby', meta, 'o', 1)
redis.call('hset', meta, 'r', run, 'd', durable)
if size > 0 then
  local expires = 0
  if ttl > 0 then
    local t = redis.call('time')
    expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
  end
  redis.call('xadd', stream, 'MAXLEN', size, string.format('%d-0', offset),
             'd', data, 'i', info, 'x', string.format('%d', expires))
  if ttl > 0 then
    redis.call('pexpire', stream, ttl)
    redis.call('pexpire', meta, ttl)
  else
    redis.call('persist', stream)
    redis.call('persist', meta)
  end
elseif meta_ttl > 0 then
  redis.call('pexpire', meta, meta_ttl)
else
  -- The namespace may have kept history (with a TTL) before: published keys persist.
  redis.call('persist', meta)
end
-- ARGV[8]: 'spublish' on a Redis Cluster (sharded Pub/Sub, to the slot's master only).
redis.call(ARGV[8], pubsub,
  'p' .. string.format('%d', offset) .. ':' .. epoch .. ':' .. string.len(info) .. ':' .. info .. data)
"""

PUBLISH = (
    _PUBLISH_BODY
    + """
return {offset, epoch}
"""
)

# Idempotent publish: the same script behind a look-up of the idempotency key (KEYS[4]),
# so of two nodes racing with one key exactly one publishes (the script is atomic).  A
# remembered key answers its original position and publishes nothing (third value 1);
# otherwise the publication's position is stored with SET NX PX window (ARGV[9], ms).
PUBLISH_ONCE = (
    """
local remembered = redis.call('get', KEYS[4])
if remembered then
  local o, e = string.match(remembered, '^(%d+):(.*)$')
  return {tonumber(o), e, 1}
end
"""
    + _PUBLISH_BODY
    + """
redis.call('set', KEYS[4], string.format('%d', offset) .. ':' .. epoch, 'NX', 'PX', tonumber(ARGV[9]))
return {offset, epoch, 0}
"""
)

HISTORY = """
local stream, meta = KEYS[1], KEYS[2]
local since_offset, since_epoch = ARGV[2], ARGV[3]
local limit, reverse = tonumber(ARGV[4]), ARGV[5]
local epoch = redis.call('hget', meta, 'e')
if not epoch then
  -- No stream: a read stores nothing for the channel (a left-over stream key is stale).
  return {0, empty_epoch(KEYS[3], ARGV[1]), {}}
end
local offset = tonumber(redis.call('hget', meta, 'o') or '0')
if limit == 0 then return {offset, epoch, {}} end
-- Entries expire one by one (field x); they are in expiry order, so trim the head.
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  local head = redis.call('xrange', stream, '-', '+', 'COUNT', 100)
  local cut = nil
  for _, entry in ipairs(head) do
    local fields, expires = entry[2], 0
    for i = 1, #fields, 2 do
      if fields[i] == 'x' then expires = tonumber(fields[i + 1]) end
    end
    if expires > 0 and expires <= now then cut = entry[1] else break end
  end
  if cut == nil then break end
  local n = tonumber(string.match(cut, '^(%d+)'))
  redis.call('xtrim', stream, 'MINID', string.format('%d-0', n + 1))
  if cut ~= head[#head][1] then break end
end
local start = '-'
if since_offset ~= '' and since_epoch == epoch then
  start = string.format('%d-0', tonumber(since_offset) + 1)
end
local entries
if reverse == '1' then
  if limit > 0 then
    entries = redis.call('xrevrange', stream, '+', start, 'COUNT', limit)
  else
    entries = redis.call('xrevrange', stream, '+', start)
  end
else
  if limit > 0 then
    entries = redis.call('xrange', stream, start, '+', 'COUNT', limit)
  else
    entries = redis.call('xrange', stream, start, '+')
  end
end
return {offset, epoch, entries}
"""

# The node-side high-water mark found the stream below what this node delivered in the
# same epoch (a rollback the run-id stamp could not see): every later offset of that epoch
# repeats one already handed out, so the epoch is dropped (unless another node did it).
RESET = """
if redis.call('hget', KEYS[2], 'e') == ARGV[1] then
  redis.call('del', KEYS[1], KEYS[2])
  return 1
end
return 0
"""

# What decides whether a run keeps every acknowledged write (CONFIG is not allowed here).
RUN_INFO = """
local server = redis.call('info', 'server')
local persistence = redis.call('info', 'persistence')
local replication = redis.call('info', 'replication')
return {
  string.match(server, 'run_id:(%x+)'),
  string.match(persistence, 'aof_enabled:(%d+)') or '0',
  string.match(replication, 'role:(%a+)') or '',
  string.match(replication, 'second_repl_offset:(%-?%d+)') or '',
}
"""


__all__ = [
    "EMPTY_EPOCH",
    "EPOCH_BUCKETS",
    "HISTORY",
    "PUBLISH",
    "PUBLISH_ONCE",
    "RESET",
    "RUN_CHECK",
    "RUN_INFO",
    "bucket_tag",
    "epoch_bucket",
]
