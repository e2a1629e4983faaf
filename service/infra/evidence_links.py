"""The cards' "Full evidence" links: each card's full evidence (fhir_mappings.cds.evidence_view),
kept for a short time under an unguessable token, and the URL that opens it
(`{SPINEWATCH_PUBLIC_BASE_URL}/evidence/{token}`, service/api/routes/evidence.py).

The URL is a capability: whoever holds it can read the page until it expires
(SPINEWATCH_EVIDENCE_LINK_TTL_SECONDS), with no other authentication (an EHR opens a card's
absolute link as it is, CDS Hooks 2.0 §Link). So the token is 192 random bits
(`secrets.token_urlsafe(24)`), the TTL is short, and the token is never logged nor audited.

Where the pages are kept: Redis when SPINEWATCH_EVIDENCE_LINK_REDIS_URL is set (`SET
spinewatch:evidence:<token> <json> EX <ttl>`, i.e. SETEX; every process can open every link),
otherwise this process's memory (at most MEMORY_MAX_ENTRIES, the oldest dropped first; a link is
then only good on the process that made it). A link that cannot be stored is no reason to fail a hook call: `issue`
logs a warning (the error class only) and answers None, and the card goes without the link.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import structlog
from service.core.errors import EvidenceStoreUnavailable  # noqa: F401 - re-exported

log = structlog.get_logger("spinewatch.evidence")

KEY_PREFIX = "spinewatch:evidence:"
MEMORY_MAX_ENTRIES = 10_000
TOKEN_BYTES = 24  # 192 bits; token_urlsafe(24) is 32 characters of [A-Za-z0-9_-]
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{32}$")
REDIS_TIMEOUT_SECONDS = 0.5  # a hook call must not wait long for its link




class EvidenceStore(Protocol):
    def put(self, token: str, record: dict, ttl: int) -> None: ...

    def get(self, token: str) -> dict | None: ...


class MemoryEvidenceStore:
    """In this process: an OrderedDict in insertion order, bounded, each entry with its expiry time
    by `clock` (monotonic seconds; tests move it)."""

    def __init__(self, max_entries: int = MEMORY_MAX_ENTRIES, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, token: str, record: dict, ttl: int) -> None:
        data = json.dumps(record, separators=(",", ":"))  # stored as Redis would: a copy, not the caller's dict
        with self._lock:
            now = self.clock()
            self._entries[token] = (now + ttl, data)
            self._entries.move_to_end(token)
            while self._entries:  # drop the expired from the old end, then the oldest over the bound
                oldest, (expires, _) = next(iter(self._entries.items()))
                if expires > now and len(self._entries) <= self.max_entries:
                    break
                del self._entries[oldest]

    def get(self, token: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                return None
            expires, data = entry
            if self.clock() >= expires:
                del self._entries[token]
                return None
        return json.loads(data)

    def __len__(self) -> int:
        return len(self._entries)


class RedisEvidenceStore:
    """Shared by every process: SET spinewatch:evidence:<token> <json> EX <ttl> (SETEX)."""

    def __init__(self, url: str, client=None):
        if client is None:
            from service.infra.redis import redis_client

            client = redis_client(url, REDIS_TIMEOUT_SECONDS)
        self.client = client

    @staticmethod
    def key(token: str) -> str:
        return KEY_PREFIX + token

    def put(self, token: str, record: dict, ttl: int) -> None:
        # SET key value EX ttl: what SETEX does (redis-py deprecates its setex()), atomic with the expiry
        self.client.set(self.key(token), json.dumps(record, separators=(",", ":")), ex=ttl)

    def get(self, token: str) -> dict | None:
        try:
            data = self.client.get(self.key(token))
        except Exception as exc:  # noqa: BLE001 - redis.RedisError and socket errors alike
            raise EvidenceStoreUnavailable(type(exc).__name__) from None
        return None if data is None else json.loads(data)


class EvidenceLinks:
    """Issue a link for a card's full evidence, and find the evidence of a link."""

    def __init__(self, store: EvidenceStore, base_url: str, ttl: int):
        self.store = store
        self.base_url = base_url.rstrip("/")
        self.ttl = ttl

    @classmethod
    def from_settings(cls, settings) -> "EvidenceLinks | None":
        """None (no links) when switched off, or without SPINEWATCH_PUBLIC_BASE_URL: a card link must
        be an absolute URL, and the Host header of a hook call is not one to trust."""
        if not settings.evidence_links or not settings.public_base_url:
            return None
        store = (RedisEvidenceStore(settings.evidence_link_redis_url) if settings.evidence_link_redis_url
                 else MemoryEvidenceStore())
        return cls(store, settings.public_base_url, settings.evidence_link_ttl_seconds)

    def url(self, token: str) -> str:
        return f"{self.base_url}/evidence/{token}"

    def issue(self, view: dict, meta: dict) -> str | None:
        """Store `view` (the page) with `meta` (who it was issued to, for the audit record) and
        answer the link's URL; None when it cannot be stored (the card then goes without it)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        try:
            self.store.put(token, {"view": view, "meta": meta}, self.ttl)
        except Exception as exc:  # noqa: BLE001 - a hook call never fails because of its link
            log.warning("evidence.link_not_stored", error=type(exc).__name__,
                        detail="card served without its full-evidence link")
            return None
        return self.url(token)

    def resolve(self, token: str) -> dict | None:
        """The stored {"view", "meta"} of a link; None when unknown, expired or not a token at all.
        Raises EvidenceStoreUnavailable when the store cannot be read."""
        if not TOKEN_PATTERN.match(token or ""):
            return None
        return self.store.get(token)
