"""Dead letters: tasks that failed for good (a permanent error, or a transient one past its last
retry) are kept in a Redis list instead of vanishing, to be listed and replayed
(`spinewatch dead-letters list|replay`).

An entry holds the task name and arguments (patient references, event numbers: ids, no clinical
content), the error's class and message (messages of our errors name interactions and statuses,
never values), and when and after how many retries it failed.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

KEY = "spinewatch:dead-letters"


class DeadLetters:
    def __init__(self, redis_client):
        self.redis = redis_client

    def push(self, *, task_id: str, task: str, args: list | tuple, kwargs: dict, error: BaseException,
             retries: int) -> dict:
        entry = {
            "id": task_id,
            "task": task,
            "args": list(args or []),
            "kwargs": dict(kwargs or {}),
            "error": type(error).__name__,
            "message": str(getattr(error, "message", None) or error)[:300],
            "retries": retries,
            "failed_at": datetime.now(timezone.utc).isoformat(),
        }
        self.redis.rpush(KEY, json.dumps(entry, default=str))
        return entry

    def entries(self) -> list[dict]:
        return [json.loads(raw) for raw in self.redis.lrange(KEY, 0, -1)]

    def __len__(self) -> int:
        return int(self.redis.llen(KEY))

    def replay(self, queue, ids: list[str] | None = None) -> list[str]:
        """Send each chosen entry again by task name, then remove it (removed only once it is queued,
        so a failure leaves it listed). ids None: all of them. Returns the ids replayed."""
        done = []
        for raw in self.redis.lrange(KEY, 0, -1):
            entry = json.loads(raw)
            if ids is not None and entry["id"] not in ids:
                continue
            queue.send(entry["task"], args=entry.get("args") or [], kwargs=entry.get("kwargs") or {})
            self.redis.lrem(KEY, 1, raw)
            done.append(entry["id"])
        return done
