"""The workers' Redis broker transport: kombu's, with the restore of unacknowledged messages made to
survive a lost broker connection (workers/celery_app.py sets `broker_transport` to it).

Why (tests/workers/test_faults.py shows it): when Redis restarts while a worker holds
unacknowledged messages (with acks_late, every running task; and every task waiting for its
countdown), kombu closes the channel and "restores" those messages with a client built from the
channel's connection, which the disconnect has already cleared. kombu 5.7 raises AttributeError
("'NoneType' object has no attribute 'hostname'", kombu/transport/redis.py `_connparams`), Celery
calls it an unrecoverable error and the worker process exits: nothing is evaluated until someone
restarts it, and the held tasks come back only after the visibility timeout (1 h by default).

The same holds for an acknowledgement or a rejection that arrives on the old channel after the
reconnect (a task that finished, or was cancelled, meanwhile): the same AttributeError, the same exit.

Here each of them is done again with a client of its own, made from the broker URL (retried while
Redis comes back), exactly as kombu does it: each message is taken out of the unacked hash and
pushed back on its queue in one transaction, so a message is never both restored and left, nor
dropped. If Redis stays away, the messages stay in the unacked hash (they are persisted there)
and kombu's periodic sweep restores them after the visibility timeout. The worker lives on and
reconnects either way.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import redis
from kombu.log import get_logger
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from service.infra.redis import SENTINEL_PORT, SentinelGroup, redis_client

logger = get_logger("spinewatch.broker")
RESTORE_FOR_SECONDS = 10.0


class QoS(kombu_redis.QoS):
    """Each operation on the unacked hash, when the channel's connection is gone, done again with a
    client of its own. Restored or acknowledged messages are taken out of the hash and (restored)
    pushed back in one transaction, as kombu does, so a retry can neither drop nor duplicate one."""

    def restore_unacked(self, client=None):
        try:
            return super().restore_unacked(client)
        except Exception as exc:  # noqa: BLE001 - the channel's connection is gone (AttributeError) or Redis is
            logger.warning("broker.restore_retry: %d unacknowledged message(s), %s; restoring with a new "
                           "connection", len(self._delivered), type(exc).__name__)
        tags = list(self._delivered)
        if self._on_own_connection("restore", lambda client: [self._restore_tag(client, tag) for tag in tags]):
            self._delivered.clear()
        else:
            self._delivered.clear()  # left in the unacked hash: the visibility-timeout sweep restores them
        return None

    def ack(self, delivery_tag):
        try:
            return super().ack(delivery_tag)
        except AttributeError:  # acknowledged on a channel whose connection is gone (Redis restarted)
            self._on_own_connection("ack", lambda client: self._forget_tag(client, delivery_tag))
            virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        try:
            return super().reject(delivery_tag, requeue=requeue)
        except AttributeError:
            action = self._restore_tag if requeue else self._forget_tag
            self._on_own_connection("reject", lambda client: action(client, delivery_tag))
            virtual.QoS.ack(self, delivery_tag)

    def _on_own_connection(self, what: str, action) -> bool:
        """Run `action(client)` on a new connection, retrying while Redis comes back. False: gave up
        (the messages stay in the unacked hash, which kombu sweeps after the visibility timeout)."""
        deadline = time.monotonic() + RESTORE_FOR_SECONDS
        while True:
            try:
                client = redis_client(self.channel._spinewatch_broker_url, 2.0, connect_timeout=1.0)
                try:
                    action(client)
                    return True
                finally:
                    client.close()
            except (redis.RedisError, OSError) as exc:
                if time.monotonic() > deadline:
                    logger.error("broker.%s_deferred: left in the unacked hash for the visibility-timeout sweep "
                                 "(%s)", what, type(exc).__name__)
                    return False
                time.sleep(0.5)

    def _forget_tag(self, client: redis.Redis, tag) -> None:
        client.pipeline().zrem(self.unacked_index_key, tag).hdel(self.unacked_key, tag).execute()

    def _restore_tag(self, client: redis.Redis, tag) -> None:
        """kombu's restore_by_tag without the channel: out of the unacked hash and back on its queue,
        atomically (WATCH/MULTI: a message already restored is not pushed twice)."""
        channel = self.channel

        def transaction(pipe):
            raw = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            pipe.zrem(self.unacked_index_key, tag).hdel(self.unacked_key, tag)
            if raw:
                message, _exchange, routing_key = loads(bytes_to_str(raw))
                try:
                    message["headers"]["redelivered"] = True
                    message["properties"]["delivery_info"]["redelivered"] = True
                except (KeyError, TypeError):
                    pass
                # SpineWatch publishes to one direct queue named by its routing key (service/infra/queue/keys.py).
                queue = channel._q_for_pri(routing_key, channel._get_message_priority(message, reverse=False))
                pipe.rpush(queue, dumps(message))  # as kombu restores: next in line

        client.transaction(transaction, self.unacked_key)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Kept while the connection is there: the restore above needs it after it is gone.
        conn = self.connection.client
        auth = f"{conn.userid or ''}:{conn.password}@" if conn.password else ""
        db = str(conn.virtual_host or "0").strip("/") or "0"
        self._spinewatch_broker_url = (f"{'rediss' if conn.ssl else 'redis'}://{auth}{conn.hostname or '127.0.0.1'}:"
                                       f"{conn.port or 6379}/{db}")


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same restore, for a broker behind Redis Sentinel: its own connection is made from the
    Sentinel URL, so it reaches whichever server is the primary by then (service/infra/redis.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        conn = self.connection.client  # its alternates: one sentinel:// URL per sentinel
        sentinels = tuple((url.hostname, url.port or SENTINEL_PORT) for url in map(urlsplit, conn.alt))
        db = int(str(conn.virtual_host or "0").strip("/") or 0)
        self._spinewatch_broker_url = SentinelGroup(sentinels, self.master_name, db, conn.password).url()


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
