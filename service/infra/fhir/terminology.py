"""The optional FHIR R4 terminology server (SPINEWATCH_TERMINOLOGY_URL): SNOMED CT codes the local
value sets do not classify, asked once each whether they descend from a concept's roots.

SNOMED CT and ICD-10-CM: without a terminology server SNOMED CT is matched by explicit lists. With one,
before a record is assessed, the SNOMED CT codings of its Conditions and Observations (`code`,
`valueCodeableConcept`, `bodySite`) that no local list includes or excludes are asked about, per
root of `fhir_mappings/clinical/valuesets/server/terminology-roots.yaml`:

    GET [url]/CodeSystem/$subsumes?system=http://snomed.info/sct&codeA=<root>&codeB=<code>

(R4 §4.8.15.6); outcome `subsumes` or `equivalent` means the code belongs. The answers reach the pure
core through `Terminology.extended` only; a code a local `exclude` list names is never asked about
nor added, so exclusions still win.

Never required, never a single point of failure: one evaluation waits at most
`terminology_budget_seconds` (each request `terminology_timeout_seconds`, at most
`terminology_concurrency` at once). On any error or timeout the local value sets decide alone and
the assessment's `problems` says the server was not consulted. Answers, yes and no, are cached in
the process (LRU, `terminology_cache_seconds`), so a code is asked once; answers that arrived before
a failure are kept for the next evaluation.

The server gets the FHIR client's authentication only when it has the origin of
SPINEWATCH_FHIR_BASE_URL; otherwise none. Redirects are not followed. Logs carry counts and reasons,
never a code, a display or a patient id.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import structlog

from fhir_mappings.clinical.terminology import SNOMED, Terminology, load_terminology
from service.core.errors import TerminologyRefused, TerminologyUnavailable
from service.infra.fhir.auth import Auth, auth_from_settings
from service.infra.fhir.base import FHIR_JSON, USER_AGENT, origin, tls_context
from service.infra.fhir.terminology_roots import Roots, load_roots, questions, record_codes

log = structlog.get_logger("spinewatch.terminology_server")

CACHE_MAX_ENTRIES = 50_000
EXTENSIONS_KEPT = 64  # extended terminologies reused, most recent first
_BELONGS = frozenset({"subsumes", "equivalent"})  # codeA (the root) subsumes codeB (the record's code)
_OUTCOMES = _BELONGS | {"subsumed-by", "not-subsumed"}  # R4 ConceptSubsumptionOutcome


class AnswerCache:
    """(system|code|root) -> belongs?, positive and negative, for `ttl` seconds; least recently used
    entries go first beyond `max_entries`. Thread-safe: the API answers hooks from worker threads."""

    def __init__(self, ttl: float, max_entries: int = CACHE_MAX_ENTRIES, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.max_entries, self._clock = ttl, max_entries, clock
        self._items: OrderedDict[str, tuple[bool, float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(code: str, root: str) -> str:
        return f"{SNOMED}|{code}|{root}"

    def get(self, code: str, root: str) -> bool | None:
        key = self.key(code, root)
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[1] <= self._clock():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, code: str, root: str, belongs: bool) -> None:
        key = self.key(code, root)
        with self._lock:
            self._items[key] = (belongs, self._clock() + self.ttl)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Consultation:
    """What the server contributed to one evaluation."""

    terminology: Terminology | None = None  # None: the local value sets alone
    problem: str | None = None  # set when the server was not consulted
    added: int = 0  # codes the server placed in a concept
    asked: int = 0  # requests made for this evaluation
    roots_version: str | None = None
    refused: bool = False  # not consulted because it refused our credentials: a configuration problem

    def note(self, assessment) -> None:
        """Record it on the assessment: the problems line, and the roots' version when they counted."""
        if self.problem:
            assessment.problems.append(self.problem)
        if self.added and self.roots_version:
            assessment.rule_versions = {**assessment.rule_versions, "terminology-roots": self.roots_version}


LOCAL = Consultation()


class TerminologyServer:
    def __init__(self, base_url: str, *, timeout: float = 1.0, budget: float = 1.5, cache_seconds: float = 86_400,
                 concurrency: int = 4, auth: Auth | Callable[[], Auth] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, roots: Roots | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.budget, self.concurrency = timeout, budget, concurrency
        self.cache = AnswerCache(cache_seconds, clock=clock)
        self._auth = auth
        self._lock = threading.Lock()  # guards the lazy auth and _extensions
        self._extensions: OrderedDict[tuple, tuple[Terminology, Terminology]] = OrderedDict()
        self._token_http: httpx.Client | None = None  # for a SMART token fetch, made on first use
        self._transport = transport
        self._roots = roots

    @classmethod
    def from_settings(cls, settings, *, auth: Auth | None = None,
                      transport: httpx.AsyncBaseTransport | None = None) -> "TerminologyServer | None":
        """None when SPINEWATCH_TERMINOLOGY_URL is unset. `auth`: the FHIR client's, to share its token."""
        if not settings.terminology_url:
            return None
        shared = None
        here = origin(settings.terminology_url)
        if here is not None and here == origin(settings.fhir_base_url):
            shared = auth or (lambda: auth_from_settings(settings))  # built on first use: a bad key is not fatal
        return cls(settings.terminology_url, timeout=settings.terminology_timeout_seconds,
                   budget=settings.terminology_budget_seconds, cache_seconds=settings.terminology_cache_seconds,
                   concurrency=settings.terminology_concurrency, auth=shared, transport=transport)

    # -- one evaluation --

    async def consult(self, resources: list[dict], term: Terminology | None = None) -> Consultation:
        """The terminology for assessing `resources`: the local one extended with what the server
        says, or the local one alone and a problem. Never raises; returns within the budget."""
        started = time.monotonic()
        try:
            term = term or load_terminology()
            roots = self._roots or load_roots()
            wanted = questions(record_codes(resources), term, roots)
            answers = {(root, code): self.cache.get(code, root) for _, root, code in wanted}
            unknown = sorted(pair for pair, belongs in answers.items() if belongs is None)
            if unknown:
                async with asyncio.timeout(self.budget):
                    answers |= await self._ask_all(unknown)
        except TimeoutError:
            return self._not_consulted(f"no answer within {self.budget:g} s", started)
        except TerminologyRefused as exc:
            return self._not_consulted(str(exc), started, refused=True)
        except TerminologyUnavailable as exc:
            return self._not_consulted(str(exc), started)
        except Exception as exc:  # never a single point of failure
            return self._not_consulted(f"internal error ({type(exc).__name__})", started)
        extra: dict[str, list[str]] = {}
        for cid, root, code in wanted:
            if answers[(root, code)]:
                extra.setdefault(cid, []).append(f"{SNOMED}|{code}")
        added = len({k for keys in extra.values() for k in keys})
        if unknown or added:
            log.info("terminology.consulted", asked=len(unknown), added=added,
                     ms=round((time.monotonic() - started) * 1000, 1))
        return Consultation(self._extended(term, extra), None, added, len(unknown), roots.version)

    def _extended(self, term: Terminology, extra: dict[str, list[str]]) -> Terminology:
        # The same extension, the same object: the core's caches are keyed by the terminology's identity.
        if not extra:
            return term
        key = (id(term), frozenset((cid, k) for cid, keys in extra.items() for k in keys))
        with self._lock:
            found = self._extensions.get(key)
            if found is not None and found[0] is term:
                self._extensions.move_to_end(key)
                return found[1]
        made = term.extended(extra)
        with self._lock:
            self._extensions[key] = (term, made)
            while len(self._extensions) > EXTENSIONS_KEPT:
                self._extensions.popitem(last=False)
        return made

    def consult_sync(self, resources: list[dict], term: Terminology | None = None) -> Consultation:
        """consult() for the workers' synchronous code, on a private event loop."""
        try:
            loop = asyncio.new_event_loop()
        except Exception as exc:
            return self._not_consulted(f"internal error ({type(exc).__name__})", time.monotonic())
        try:
            return loop.run_until_complete(self.consult(resources, term))
        finally:
            # close(), not asyncio.run(): it does not wait for a token fetch still running in a thread.
            loop.close()

    def _not_consulted(self, reason: str, started: float, refused: bool = False) -> Consultation:
        log.warning("terminology.not_consulted", reason=reason, ms=round((time.monotonic() - started) * 1000, 1))
        return Consultation(problem=f"terminology server not consulted ({reason}): the local value sets decided alone",
                            refused=refused)

    # -- HTTP --

    async def _ask_all(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        """Each (root, code) answered, or TerminologyUnavailable; every answer is cached as it comes."""
        answers: dict[tuple[str, str], bool] = {}
        headers = {"Accept": FHIR_JSON, "User-Agent": USER_AGENT} | await self._auth_headers()
        gate = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.timeout), transport=self._transport,
                                     follow_redirects=False, verify=tls_context()) as http:
            async def ask(root: str, code: str) -> None:
                async with gate:
                    answers[(root, code)] = belongs = await self._subsumes(http, root, code)
                    self.cache.put(code, root, belongs)

            try:
                async with asyncio.TaskGroup() as group:  # the first failure cancels the rest
                    for root, code in pairs:
                        group.create_task(ask(root, code))
            except BaseExceptionGroup as group_error:
                raise _first(group_error) from None
        return answers

    async def _subsumes(self, http: httpx.AsyncClient, root: str, code: str) -> bool:
        params = {"system": SNOMED, "codeA": root, "codeB": code}
        try:
            r = await http.get(f"{self.base_url}/CodeSystem/$subsumes", params=params)
        except httpx.TimeoutException:
            raise TerminologyUnavailable(f"a request took over {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise TerminologyUnavailable(f"unreachable ({type(exc).__name__})") from None
        if r.status_code in (401, 403):
            auth = self._resolved_auth()
            if auth is not None:
                auth.invalidate()  # the next evaluation fetches a new token
            raise TerminologyRefused(f"HTTP {r.status_code} (not authorised)")
        if r.status_code != 200:
            raise TerminologyUnavailable(f"HTTP {r.status_code}")
        try:
            body = r.json()
        except ValueError:
            raise TerminologyUnavailable("an answer that is not JSON") from None
        outcome = _outcome(body)
        if outcome not in _OUTCOMES:
            raise TerminologyUnavailable("an answer that is not a $subsumes outcome")
        return outcome in _BELONGS

    def _resolved_auth(self) -> Auth | None:
        with self._lock:
            if callable(self._auth) and not hasattr(self._auth, "headers"):
                self._auth = self._auth()
            return self._auth

    async def _auth_headers(self) -> dict[str, str]:
        if self._auth is None:
            return {}
        try:
            auth = self._resolved_auth()
            with self._lock:
                if self._token_http is None:
                    self._token_http = httpx.Client(timeout=httpx.Timeout(self.timeout), follow_redirects=False)
            # In a thread: a SMART token fetch is synchronous, and the event loop must not wait on it.
            return await asyncio.to_thread(auth.headers, self._token_http)
        except Exception as exc:
            raise TerminologyUnavailable(f"no credentials for it ({type(exc).__name__})") from None


def _outcome(body) -> str | None:
    """Parameters.parameter[name=outcome].valueCode (R4 $subsumes OUT parameter)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        return None
    for p in body.get("parameter") or []:
        if isinstance(p, dict) and p.get("name") == "outcome":
            value = p.get("valueCode")
            return value if isinstance(value, str) else None
    return None


def _first(group_error: BaseExceptionGroup) -> BaseException:
    for exc in group_error.exceptions:
        return _first(exc) if isinstance(exc, BaseExceptionGroup) else exc
    return group_error


async def consult(server: TerminologyServer | None, resources: list[dict]) -> Consultation:
    return LOCAL if server is None else await server.consult(resources)


def consult_sync(server: TerminologyServer | None, resources: list[dict]) -> Consultation:
    return LOCAL if server is None else server.consult_sync(resources)
