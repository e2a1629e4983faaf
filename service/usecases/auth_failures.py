"""Refused callers, limited and audited in bounded amounts (issue "Hardening", finding 3).

Every surface that checks a credential (the reviewer token or session, the notification secret, the
CDS client's JWT) asks `retry_after(surface, client)` before checking, and reports each refusal with
`refused(...)`. Two things follow, both in this process's memory:

- a limiter, a sliding window of WINDOW_SECONDS (one minute): a client address with `per_client`
  refusals on a surface in the last minute, or a surface with `global_limit` refusals from all
  clients together, is answered 429 (`Retry-After`) without its credential being looked at, until
  the oldest of those refusals is a minute old. The global cap is per surface, so a flood on the
  reviewer login does not lock the EHR out of /cds-services;
- the audit aggregation: the first `audit_per_window` refusals per (surface, reason, client) in a
  window are audited one by one (as before); the window's further refusals, and the 429s, are only
  counted, and when the window has ended one `auth-failure` record summarises them (detail:
  surface, reason, count, individually, window). Summaries of ended windows are written at the
  next refusal, when a reviewer reads the log (`sweep`) and at shutdown (`flush`).

So an unauthenticated caller can add at most `global_limit` records per surface per minute (in
practice `audit_per_window` per client address) plus one summary per key, not one per request.

Limits are per process (uvicorn --workers N: N times the limits); the client address is the socket's
peer, so behind a reverse proxy run uvicorn with --proxy-headers and --forwarded-allow-ips, or every
caller shares the proxy's address and its limit.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

WINDOW_SECONDS = 60.0
RATE_LIMITED = "rate-limited"  # the reason code of a 429 (counted and summarised, never audited one by one)
ANY_CLIENT = "*"  # the client of a summary when the surface's global cap (not the client's own) applied
MAX_KEYS = 10_000  # aggregation keys kept at most; past it, new clients are summarised as ANY_CLIENT


class Write(Protocol):
    """How a record is written: an AuditLog's `event` (queued) or `record` (before returning)."""

    def __call__(self, kind: str, outcome: str, *, actor: str, detail: dict | None = None) -> object: ...


@dataclass
class _Window:
    started: float
    count: int = 0  # refusals in the window
    audited: int = 0  # of which audited one by one


@dataclass
class AuthFailures:
    per_client: int = 30
    global_limit: int = 600
    audit_per_window: int = 5
    window: float = WINDOW_SECONDS
    clock: Callable[[], float] = time.monotonic
    _clients: dict[tuple[str, str], deque] = field(default_factory=dict, repr=False)
    _surfaces: dict[str, deque] = field(default_factory=dict, repr=False)
    _windows: dict[tuple[str, str, str], _Window] = field(default_factory=dict, repr=False)  # oldest first
    _next_prune: float = field(default=-math.inf, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings, clock: Callable[[], float] = time.monotonic) -> AuthFailures:
        return cls(per_client=settings.auth_failure_limit, global_limit=settings.auth_failure_global_limit,
                   audit_per_window=settings.auth_failure_audit_per_window, clock=clock)

    # ---- the limiter ----------------------------------------------------------------------------

    def retry_after(self, surface: str, client: str, write: Write | None = None) -> int | None:
        """Seconds the client must wait before this surface looks at its credential again, or None.
        A refused-for-the-limit call is counted into the window's summary (reason `rate-limited`)."""
        now = self.clock()
        with self._lock:
            wait, own = 0.0, False
            mine = self._clients.get((surface, client))
            if mine is not None:
                self._prune(mine, now)
                if len(mine) >= self.per_client:
                    wait, own = mine[0] + self.window - now, True
            everyone = self._surfaces.get(surface)
            if everyone is not None:
                self._prune(everyone, now)
                if len(everyone) >= self.global_limit:
                    wait = max(wait, everyone[0] + self.window - now)
            due = self._ended(now)
            if wait > 0:
                # A client over its own limit is one of a bounded few; under the global cap alone it may
                # be any address at all, so those are counted together.
                self._count(surface, RATE_LIMITED, client if own else ANY_CLIENT, now, individually=False)
        if write is not None:
            self._write(write, due)
        return None if wait <= 0 else max(1, math.ceil(wait))

    # ---- refusals -------------------------------------------------------------------------------

    def refused(self, write: Write, surface: str, reason: str, client: str, *, actor: str,
                detail: dict) -> bool:
        """Count one refusal toward the client's and the surface's limits, and audit it (`detail` as
        given) if it is among the first of its window; otherwise it is left to the window's summary.
        True when it was audited one by one."""
        now = self.clock()
        with self._lock:
            mine = self._clients.get((surface, client))
            if mine is None:
                mine = self._clients[(surface, client)] = deque(maxlen=self.per_client)
            mine.append(now)
            if len(self._clients) > self.global_limit and now >= self._next_prune:
                # Forget clients with nothing left in their window (at most every tenth of a window).
                self._next_prune, stale = now + self.window / 10, now - self.window
                for key in [k for k, times in self._clients.items() if not times or times[-1] <= stale]:
                    del self._clients[key]
            everyone = self._surfaces.get(surface)
            if everyone is None:
                everyone = self._surfaces[surface] = deque(maxlen=self.global_limit)
            everyone.append(now)
            due = self._ended(now)
            individually = self._count(surface, reason, client, now, individually=True)
        self._write(write, due)
        if individually:
            write("auth-failure", "failure", actor=actor, detail=detail)
        return individually

    def sweep(self, write: Write) -> None:
        """Write the summaries of windows that have ended (a reviewer is about to read the log)."""
        with self._lock:
            due = self._ended(self.clock())
        self._write(write, due)

    def flush(self, write: Write) -> None:
        """Write every pending summary, ended or not (shutdown)."""
        with self._lock:
            due = self._ended(math.inf)
        self._write(write, due)

    # ---- inside the lock ------------------------------------------------------------------------

    def _prune(self, times: deque, now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def _count(self, surface: str, reason: str, client: str, now: float, *, individually: bool) -> bool:
        key = (surface, reason, client)
        entry = self._windows.get(key)
        if entry is None:
            if len(self._windows) >= MAX_KEYS:
                key = (surface, reason, ANY_CLIENT)
                entry = self._windows.get(key)
            if entry is None:
                entry = self._windows[key] = _Window(started=now)
        entry.count += 1
        if individually and entry.audited < self.audit_per_window:
            entry.audited += 1
            return True
        return False

    def _ended(self, now: float) -> list[tuple[tuple[str, str, str], _Window]]:
        """Remove and return the windows that have ended and hold refusals not audited one by one.
        New windows are appended, so the dict is oldest first and the scan stops at the first open one."""
        ended = []
        while self._windows:
            key, entry = next(iter(self._windows.items()))
            if entry.started + self.window > now:
                break
            del self._windows[key]
            if entry.count > entry.audited:
                ended.append((key, entry))
        return ended

    def _write(self, write: Write, due: list[tuple[tuple[str, str, str], _Window]]) -> None:
        for (surface, reason, client), entry in due:
            write("auth-failure", "failure", actor=client,
                        detail={"surface": surface, "reason": reason, "count": entry.count,
                                "individually": entry.audited, "window": int(self.window), "summary": True})
