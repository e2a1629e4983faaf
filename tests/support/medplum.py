"""A stand-in for a Medplum 4.5.2 FHIR R4 server, in the test process, on a real loopback socket, so
SpineWatch's own HTTP clients, SMART auth and notification endpoint can be proved against Medplum's
behaviour unchanged::

    with MedplumStandIn(time_scale=1e-3) as medplum:     # or the `medplum_standin` fixture
        medplum.preload(patient, condition)              # stored, nobody notified
        medplum.write(observation)                       # stored, active Subscriptions notified
        medplum.wait_for_deliveries()
        medplum.deliveries                               # every attempt: headers, body bytes, status

Medplum-faithful (Medplum documentation, medplum.com/docs/subscriptions and its "Subscription
Extensions" page; the server's subscription worker, github.com/medplum/medplum
packages/server/src/workers/subscription.ts):
- classic R4 rest-hook Subscriptions: only `active` ones are notified; the server never changes a
  Subscription's status (`requested` stays silent for ever, nothing is ever set to `error`);
- delivery: POST to channel.endpoint itself, whatever channel.payload says; the body is the resource
  at the version written (compact JSON), `{}` for a delete; headers Content-Type, X-Medplum-
  Subscription, X-Medplum-Interaction, X-Medplum-Deleted-Resource (deletes), each channel.header
  split at ':' keeping only the part before a second ':', X-Signature = hex HMAC-SHA256 of the body
  with the subscription-secret extension, x-trace-id, and node-fetch's own User-Agent, Accept,
  Accept-Encoding and Connection; no handshake, heartbeat, event numbers, $status or $events;
- each matching Subscription is its own job and jobs run concurrently; a non-2xx answer or no answer
  is retried (BullMQ exponential backoff: 1 s * 2^(n-1) after the n-th failure, 18 attempts, so
  2^17 - 1 s, about 36 h, in all: Medplum's comment "about 73 hours" is 2^18 s); every
  attempt writes an AuditEvent "Attempt N received status S" (N counts the attempts made before it,
  as BullMQ's attemptsMade: the first is Attempt 0) whose entity names the Subscription; a job stops
  when its Subscription is gone or no longer active, and a retry stops when the resource has a newer
  version (or is deleted); AuditEvents notify nobody;
- meta.versionId a UUID, meta.lastUpdated, meta.author, meta.project, meta.compartment (Project and
  Patient) on every write; an update that changes nothing writes no version; a deleted resource
  reads 410 Gone and keeps its history; errors are OperationOutcomes; unknown search parameters 400;
- auth: client credentials (secret, form or Basic) and SMART Backend Services (private_key_jwt,
  RS256/384/512, ES256/384/512; the client's JWK Set registered or fetched from its jwksUri); the
  requested `system/` scopes become the token's access policy (SMART App Launch 2.x "Scopes for
  requesting clinical data": c create, r read/vread/instance history, u update, d delete, s search;
  v1 .read = .rs, .write = .cud, .* = .cruds; out-of-order letters rejected as invalid_scope);
  `scope_semantics="medplum"` applies Medplum's own coarser reading instead (`medplum_scopes`).

Simplified: an in-memory store, one project; opaque access tokens (Medplum's are JWTs); no
validation against StructureDefinitions; search covers the parameters SpineWatch sends (_id,
_lastUpdated, patient, subject, identifier, status, url, code, category, entity, date; _count with
_offset paging, _sort on date/_lastUpdated/_id; _elements ignored), dates compared by their start
instant; a request needs a token only with `auth_required` (or when it carries one); scopes with
`?param=value` constraints are rejected, non-`system/` ones not granted; a
channel.header with no ':' is dropped; redirects are not followed; retry delays are multiplied by
`time_scale` so a test runs 18 attempts in milliseconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import httpx
import jwt
import pytest

FHIR_PATH = "/fhir/R4"
FHIR_JSON = "application/fhir+json"
SECRET_EXTENSION = "https://www.medplum.com/fhir/StructureDefinition/subscription-secret"
NODE_FETCH_HEADERS = {"Accept": "*/*", "User-Agent": "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
                      "Accept-Encoding": "gzip,deflate", "Connection": "close"}
SIGNING_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2
ATTEMPTS = 18
TOKEN_LIFETIME = 3600
SERVER_META = ("versionId", "lastUpdated", "author", "project", "compartment")
V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]+")
# R4 search parameter `date` of each type, by its element (a Period counts by its start).
DATE_FIELDS = {"Observation": ("effectiveDateTime", "effectivePeriod", "effectiveInstant"),
               "DiagnosticReport": ("effectiveDateTime", "effectivePeriod"),
               "Procedure": ("performedDateTime", "performedPeriod"), "DocumentReference": ("date",),
               "ClinicalImpression": ("date",), "Encounter": ("period",), "CareTeam": ("period",),
               "AuditEvent": ("recorded",)}
PAGING = ("_count", "_offset", "_sort", "_elements")


def retry_delay(failures: int) -> float:
    """Seconds before the next attempt after `failures` failed ones (BullMQ exponential, delay 1 s)."""
    return 2.0 ** (failures - 1)


class FHIRFailure(Exception):
    def __init__(self, status: int, message: str, code: str = "processing"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class OAuthError(Exception):
    """RFC 6749 §5.2: {"error": code}."""

    def __init__(self, status: int, code: str):
        super().__init__(code)
        self.status, self.code = status, code


def outcome(message: str, code: str = "processing", severity: str = "error") -> dict:
    return {"resourceType": "OperationOutcome", "id": str(uuid.uuid4()),
            "issue": [{"severity": severity, "code": code, "details": {"text": message}}]}


def instant_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_instant(text: str) -> datetime:
    """A FHIR date, dateTime or instant as an aware datetime (a partial date at its start, UTC)."""
    formats = {4: "%Y", 7: "%Y-%m", 10: "%Y-%m-%d"}
    try:
        if len(text) in formats:
            return datetime.strptime(text, formats[len(text)]).replace(tzinfo=timezone.utc)
        when = datetime.fromisoformat(text)
    except ValueError:
        raise FHIRFailure(400, f"Invalid date: {text}", "invalid") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def compact(resource: dict) -> bytes:
    return json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode()


# ---------------- search (R4 §3.1.1) ----------------

def _references(resource: dict, fields: tuple[str, ...]) -> list[str]:
    return [resource[f]["reference"] for f in fields
            if isinstance(resource.get(f), dict) and isinstance(resource[f].get("reference"), str)]


def _reference_matches(references: list[str], value: str, only_type: str | None) -> bool:
    keys = ["/".join(r.split("/")[-2:]) for r in references]
    keys = [k for k in keys if only_type is None or k.startswith(only_type + "/")]
    for wanted in value.split(","):
        wanted = "/".join(wanted.split("/")[-2:])
        if any(k == wanted or ("/" not in wanted and k.split("/")[-1] == wanted) for k in keys):
            return True
    return False


def _codings(node) -> list[tuple[str | None, str | None]]:
    concepts = node if isinstance(node, list) else [node] if isinstance(node, dict) else []
    return [(c.get("system"), c.get("code")) for cc in concepts for c in cc.get("coding") or []]


def _token_matches(pairs: list[tuple[str | None, str | None]], value: str) -> bool:
    """`code`, `system|code`, `|code` (no system) or `system|` (any code of it), comma = OR."""
    for wanted in value.split(","):
        system, bar, code = wanted.partition("|")
        system, code = (system, code) if bar else (None, wanted)
        if any((system is None or (s or "") == system) and (code == "" or c == code) for s, c in pairs):
            return True
    return False


def _dates(resource: dict, fields: tuple[str, ...]) -> list[str]:
    values = [resource.get(f) for f in fields]
    return [v.get("start") if isinstance(v, dict) else v for v in values if v]


def _date_matches(values: list[str | None], query: str) -> bool:
    prefix, raw = (query[:2], query[2:]) if query[:2] in ("eq", "gt", "ge", "lt", "le") else ("eq", query)
    target = parse_instant(raw)
    compare = {"eq": lambda a: a == target, "gt": lambda a: a > target, "ge": lambda a: a >= target,
               "lt": lambda a: a < target, "le": lambda a: a <= target}[prefix]
    return any(compare(parse_instant(v)) for v in values if v)


def _matcher(rtype: str, name: str):
    """fn(resource, value) -> bool for search parameter `name` on `rtype`; 400 when unknown."""
    def identifiers(r: dict) -> list[tuple[str | None, str | None]]:
        found = r.get("identifier")
        return [(i.get("system"), i.get("value")) for i in (found if isinstance(found, list) else [found or {}])]

    def url(r: dict) -> str | None:  # Subscription `url` searches channel.endpoint
        return (r.get("channel") or {}).get("endpoint") if rtype == "Subscription" else r.get("url")

    simple = {
        "_id": lambda r, v: r.get("id") in v.split(","),
        "_lastUpdated": lambda r, v: _date_matches([r["meta"]["lastUpdated"]], v),
        "patient": lambda r, v: _reference_matches(_references(r, ("subject", "patient")), v, "Patient"),
        "subject": lambda r, v: _reference_matches(_references(r, ("subject",)), v, None),
        "identifier": lambda r, v: _token_matches(identifiers(r), v),
        "status": lambda r, v: _token_matches([(None, r.get("status"))], v),
        "code": lambda r, v: _token_matches(_codings(r.get("code")), v),
        "category": lambda r, v: _token_matches(_codings(r.get("category")), v),
        "url": lambda r, v: url(r) == v,
    }
    if name in simple:
        return simple[name]
    if name == "date" and rtype in DATE_FIELDS:
        return lambda r, v: _date_matches(_dates(r, DATE_FIELDS[rtype]), v)
    if name == "entity" and rtype == "AuditEvent":
        return lambda r, v: _reference_matches(
            [(e.get("what") or {}).get("reference", "") for e in r.get("entity") or []], v, None)
    raise FHIRFailure(400, f"Unknown search parameter: {name}", "invalid")


def search_filter(rtype: str, params: list[tuple[str, str]]):
    """fn(resource) -> bool: every non-paging parameter matches (repeated ones AND)."""
    tests = [(_matcher(rtype, name), value) for name, value in params if name not in PAGING]
    return lambda resource: all(test(resource, value) for test, value in tests)


def _sort_key(rtype: str, name: str):
    if name == "_lastUpdated":
        return lambda r: r["meta"]["lastUpdated"]
    if name == "_id":
        return lambda r: r["id"]
    if name == "date" and rtype in DATE_FIELDS:
        return lambda r: min((parse_instant(d) for d in _dates(r, DATE_FIELDS[rtype])),
                             default=datetime.min.replace(tzinfo=timezone.utc))
    raise FHIRFailure(400, f"Unknown sort parameter: {name}", "invalid")


# ---------------- auth (SMART App Launch 2.x; RFC 6749, RFC 7523) ----------------

def parse_scopes(scope: str) -> dict[str, str]:
    """Resource type (or *) -> permitted interaction letters, from the `system/` scopes asked for."""
    granted: dict[str, str] = {}
    for item in scope.split():
        if not item.startswith("system/"):
            continue  # openid, launch, patient/ and user/ scopes grant nothing to a backend client
        found = re.fullmatch(r"system/(\*|[A-Z][A-Za-z]+)\.([a-z*]+)", item)
        letters = found and (V1_PERMISSIONS.get(found[2]) or re.fullmatch("c?r?u?d?s?", found[2]) and found[2])
        if not letters:
            raise OAuthError(400, "invalid_scope")
        granted[found[1]] = "".join(sorted(set(granted.get(found[1], "") + letters), key="cruds".index))
    if not granted:
        raise OAuthError(400, "invalid_scope")
    return granted


def medplum_scopes(scope: str) -> dict[str, str] | None:
    """Medplum's own reading (packages/server/src/fhir/smart.ts): scopes it cannot parse are ignored
    (none left: the whole access), a type takes the first scope naming it, else the first naming *,
    and that scope makes it read-only when its letters are only r and s, read-write otherwise (a
    `?param=value` constraint, which Medplum applies as search criteria, is not enforced here)."""
    policy: dict[str, str] = {}
    for item in scope.split():
        found = re.fullmatch(r"(?:patient|user|system)/(\w+|\*)\.(read|write|c?r?u?d?s?|\*)", item.split("?")[0])
        if found:
            read_only = re.fullmatch("[rs]+", V1_PERMISSIONS.get(found[2], found[2]))
            policy.setdefault(found[1], "rs" if read_only else "cruds")
    return policy or None


@dataclass
class Client:
    client_id: str
    secret: str | None = None
    jwks: dict | None = None
    jwks_uri: str | None = None


@dataclass
class Grant:
    client_id: str
    permissions: dict[str, str] | None  # None: the client's whole project access
    expires_at: float
    type_first: bool = False  # Medplum's reading: a type's own entry, else *'s; SMART's: both add up

    def permit(self, rtype: str, letter: str) -> None:
        if self.permissions is None:
            return
        everything = self.permissions.get("*", "")
        letters = self.permissions.get(rtype, everything) if self.type_first else \
            self.permissions.get(rtype, "") + everything
        if letter not in letters:
            raise FHIRFailure(403, "Forbidden", "forbidden")


# ---------------- the store and the subscription jobs ----------------

@dataclass
class Version:
    resource: dict  # with meta; for a delete, the content last written
    deleted: bool = False


@dataclass
class Job:
    subscription_id: str
    resource_type: str
    resource_id: str
    version_id: str
    interaction: str  # create | update | delete
    trace_id: str
    request_time: str


@dataclass
class Delivery:
    """One delivery attempt as sent (header names lower-cased) and as answered (status None: no answer)."""
    subscription_id: str
    attempt: int
    interaction: str
    url: str
    headers: dict[str, str]
    body: bytes
    status: int | None
    error: str | None
    sent_at: float  # time.monotonic() when sent, and when answered (or failed)
    answered_at: float


class MedplumStandIn:
    def __init__(self, *, auth_required: bool = False, time_scale: float = 1.0, attempts: int = ATTEMPTS,
                 scope_semantics: str = "smart", delivery_timeout: float = 30.0, host: str = "127.0.0.1",
                 port: int = 0):
        if scope_semantics not in ("smart", "medplum"):
            raise ValueError("scope_semantics is 'smart' or 'medplum'")
        self.auth_required, self.time_scale, self.attempts = auth_required, time_scale, attempts
        self.scope_semantics = scope_semantics
        self.project_id = str(uuid.uuid4())
        self.admin = {"reference": f"Practitioner/{uuid.uuid4()}"}
        self.deliveries: list[Delivery] = []
        self._lock = threading.RLock()
        self._history: dict[tuple[str, str], list[Version]] = {}
        self._clients: dict[str, Client] = {}
        self._grants: dict[str, Grant] = {}
        self._jtis: set[str] = set()
        self._jobs = threading.Condition()
        self._pending = 0
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._serving: threading.Thread | None = None
        self._http = httpx.Client(timeout=delivery_timeout, follow_redirects=False)
        self._server = LocalHTTPServer((host, port), _Handler)
        self._server.standin = self  # type: ignore[attr-defined]
        self.origin = f"http://{host}:{self._server.server_address[1]}"
        self.base_url = self.origin + FHIR_PATH
        self.token_url = self.origin + "/oauth2/token"

    # -- lifecycle --

    def start(self) -> "MedplumStandIn":
        self._serving = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="medplum-standin",
                                         daemon=True)
        self._serving.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._serving is not None:
            self._server.shutdown()
        self._server.server_close()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._http.close()

    def __enter__(self) -> "MedplumStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests do on the server side --

    def preload(self, *resources: dict) -> list[dict]:
        """Store resources as they are (ids kept, or assigned), notifying nobody."""
        with self._lock:
            return [self._store(r | {"id": r.get("id") or str(uuid.uuid4())}, self.admin) for r in resources]

    def write(self, resource: dict) -> dict:
        """Create (no id, or an unknown one) or update, notifying the active Subscriptions it matches."""
        with self._lock:
            if resource.get("id") and self._current(resource["resourceType"], resource["id"]):
                return self._update(resource, self.admin, str(uuid.uuid4()))[0]
            return self._create(resource | {"id": resource.get("id") or str(uuid.uuid4())}, self.admin,
                                str(uuid.uuid4()))

    def delete(self, resource_type: str, resource_id: str) -> None:
        self._delete(resource_type, resource_id, self.admin, str(uuid.uuid4()))

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        with self._lock:
            current = self._current(resource_type, resource_id)
            return current.resource if current and not current.deleted else None

    def search(self, resource_type: str, params: list[tuple[str, str]] = ()) -> list[dict]:
        """The current resources a search would find (first page of 1000), as a test reads them."""
        return [e["resource"] for e in self._search(resource_type, [*params, ("_count", "1000")])["entry"]]

    def register_client(self, client_id: str, *, secret: str | None = None, jwks: dict | None = None,
                        jwks_uri: str | None = None) -> None:
        """A ClientApplication: a secret (client credentials), a JWK Set or a jwksUri (private_key_jwt)."""
        self._clients[client_id] = Client(client_id, secret, jwks, jwks_uri)

    def expire_tokens(self) -> None:
        """Every access token issued so far now answers 401, as an expired one does."""
        for grant in self._grants.values():
            grant.expires_at = 0.0

    def wait_for_deliveries(self, timeout: float = 10.0) -> None:
        """Until every job (its retries included) has finished; TimeoutError otherwise."""
        with self._jobs:
            if not self._jobs.wait_for(lambda: self._pending == 0, timeout):
                raise TimeoutError(f"{self._pending} subscription job(s) still running after {timeout} s")

    # -- the store (callers hold self._lock) --

    def _current(self, rtype: str, rid: str) -> Version | None:
        versions = self._history.get((rtype, rid))
        return versions[-1] if versions else None

    def _live(self, rtype: str) -> list[dict]:
        return [v[-1].resource for (t, _), v in self._history.items() if t == rtype and not v[-1].deleted]

    def _store(self, resource: dict, author: dict, deleted: bool = False) -> dict:
        rtype, rid = resource["resourceType"], resource["id"]
        patients = [f"Patient/{rid}"] if rtype == "Patient" else \
            [r for r in _references(resource, ("subject", "patient")) if r.startswith("Patient/")]
        meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in SERVER_META} | {
            "versionId": str(uuid.uuid4()), "lastUpdated": instant_now(), "author": author,
            "project": self.project_id,
            "compartment": [{"reference": f"Project/{self.project_id}"}] + [{"reference": p} for p in patients]}
        body = {k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")}
        stored = {"resourceType": rtype, "id": rid, "meta": meta} | body
        self._history.setdefault((rtype, rid), []).append(Version(stored, deleted))
        return stored

    def _create(self, resource: dict, author: dict, trace_id: str) -> dict:
        with self._lock:
            stored = self._store(resource, author)
            self._notify(stored, "create", trace_id)
            return stored

    def _update(self, resource: dict, author: dict, trace_id: str) -> tuple[dict, bool]:
        """(the resource, whether it was created)."""
        with self._lock:
            current = self._current(resource["resourceType"], resource["id"])
            if current and not current.deleted and _content(current.resource) == _content(resource):
                return current.resource, False  # nothing changed: no new version, nobody notified
            stored = self._store(resource, author)
            created = current is None or current.deleted
            self._notify(stored, "create" if created else "update", trace_id)
            return stored, created

    def _delete(self, rtype: str, rid: str, author: dict, trace_id: str) -> None:
        with self._lock:
            current = self._current(rtype, rid)
            if current is None:
                raise FHIRFailure(404, "Not found", "not-found")
            if current.deleted:
                raise FHIRFailure(410, "Deleted", "deleted")
            self._notify(self._store(current.resource, author, deleted=True), "delete", trace_id)

    # -- subscriptions --

    def _notify(self, resource: dict, interaction: str, trace_id: str) -> None:
        """One job per active rest-hook Subscription whose criteria the resource matches."""
        if resource["resourceType"] == "AuditEvent":
            return
        for sub in self._live("Subscription"):
            if sub.get("status") == "active" and (sub.get("channel") or {}).get("type") == "rest-hook" \
                    and _criteria_match(sub.get("criteria", ""), resource):
                self._start(Job(sub["id"], resource["resourceType"], resource["id"], resource["meta"]["versionId"],
                                interaction, trace_id, instant_now()))

    def _start(self, job: Job) -> None:
        with self._jobs:
            self._pending += 1
        thread = threading.Thread(target=self._run, args=(job,), name=f"medplum-job-{job.subscription_id}",
                                  daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _run(self, job: Job) -> None:
        try:
            for attempt in range(self.attempts):
                if attempt and self._stopping.wait(retry_delay(attempt) * self.time_scale):
                    return
                request = self._prepare(job, attempt)
                if request is None or self._attempt(job, attempt, *request):
                    return
        finally:
            with self._jobs:
                self._pending -= 1
                self._jobs.notify_all()

    def _prepare(self, job: Job, attempt: int) -> tuple[dict, str, dict[str, str], bytes] | None:
        """(subscription, url, headers, body) of an attempt, or None when the job is over."""
        with self._lock:
            sub = self._current("Subscription", job.subscription_id)
            if sub is None or sub.deleted or sub.resource.get("status") != "active":
                return None
            sub = sub.resource
            if not (sub.get("channel") or {}).get("endpoint"):
                return None  # Medplum ignores a rest-hook without a URL
            current = self._current(job.resource_type, job.resource_id)
            if job.interaction != "delete" and (current.deleted or
                                                attempt and current.resource["meta"]["versionId"] != job.version_id):
                return None  # a retry of an older version is dropped
            resource = next(v.resource for v in self._history[(job.resource_type, job.resource_id)]
                            if v.resource["meta"]["versionId"] == job.version_id)
        body = b"{}" if job.interaction == "delete" else compact(resource)
        headers = {"Content-Type": FHIR_JSON, "X-Medplum-Subscription": sub["id"],
                   "X-Medplum-Interaction": job.interaction}
        if job.interaction == "delete":
            headers["X-Medplum-Deleted-Resource"] = f"{job.resource_type}/{job.resource_id}"
        for header in (sub.get("channel") or {}).get("header") or []:
            parts = header.split(":")
            if len(parts) > 1:  # Medplum keeps the text between the first and the second ':'
                headers[parts[0].strip()] = parts[1].strip()
        secret = next((e.get("valueString") for e in sub.get("extension") or [] if e.get("url") == SECRET_EXTENSION),
                      None)
        if isinstance(secret, str) and secret:
            headers["X-Signature"] = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers["x-trace-id"] = job.trace_id
        return sub, sub["channel"]["endpoint"], headers | NODE_FETCH_HEADERS, body

    def _attempt(self, job: Job, attempt: int, sub: dict, url: str, headers: dict, body: bytes) -> bool:
        request = self._http.build_request("POST", url, headers=headers, content=body)
        status, error, sent_at = None, None, time.monotonic()
        try:
            status = self._http.send(request).status_code
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        self.deliveries.append(Delivery(sub["id"], attempt, job.interaction, url, dict(request.headers), body,
                                        status, error, sent_at, time.monotonic()))
        ok = status is not None and 200 <= status < 300
        said = f"received status {status}" if status is not None else f"received error {error}"
        self._audit(job, sub, ok, f"Attempt {attempt} {said}")
        return ok

    def _audit(self, job: Job, sub: dict, ok: bool, description: str) -> None:
        role = {"code": "1", "display": "Patient"} if job.resource_type == "Patient" else \
            {"code": "4", "display": "Domain"}
        event = {"resourceType": "AuditEvent", "id": str(uuid.uuid4()), "type": {"code": "transmit"},
                 "period": {"start": job.request_time, "end": instant_now()}, "recorded": instant_now(),
                 "agent": [{"type": {"text": "Subscription"}, "requestor": False}],
                 "source": {"observer": {"reference": f"Subscription/{sub['id']}"}},
                 "entity": [{"what": {"reference": f"{job.resource_type}/{job.resource_id}"}, "role": role},
                            {"what": {"reference": f"Subscription/{sub['id']}"},
                             "role": {"code": "9", "display": "Subscriber"}}],
                 "outcome": "0" if ok else "4", "outcomeDesc": description}
        with self._lock:
            self._store(event, self.admin)

    # -- HTTP --

    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict, dict[str, str]]:
        """(status, JSON document, headers) for one request."""
        parts = urlsplit(raw_path)
        path, query = parts.path.rstrip("/"), parse_qsl(parts.query, keep_blank_values=True)
        try:
            if path == "/oauth2/token" and method == "POST":
                return 200, self._token(headers, body), {"Content-Type": "application/json",
                                                         "Cache-Control": "no-store"}
            if path in ("/.well-known/smart-configuration", FHIR_PATH + "/.well-known/smart-configuration"):
                return 200, self.smart_configuration(), {"Content-Type": "application/json"}
            if not path.startswith(FHIR_PATH + "/"):
                raise FHIRFailure(404, "Not found", "not-found")
            segments = path[len(FHIR_PATH) + 1:].split("/")
            if segments == ["metadata"] and method == "GET":
                return 200, self.capability_statement(), {"Content-Type": FHIR_JSON}
            status, document, extra = self._fhir(method, segments, query, headers, body, self._authorize(headers))
            return status, document, {"Content-Type": FHIR_JSON} | extra
        except OAuthError as exc:
            return exc.status, {"error": exc.code}, {"Content-Type": "application/json"}
        except FHIRFailure as exc:
            extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
            return exc.status, outcome(exc.message, exc.code), {"Content-Type": FHIR_JSON} | extra

    def _fhir(self, method: str, segments: list[str], query, headers, body: bytes, grant: Grant | None):
        rtype, rest = segments[0], segments[1:]
        if not RESOURCE_TYPE.fullmatch(rtype) or any(s.startswith(("$", "_search")) for s in rest):
            raise FHIRFailure(404, "Not found", "not-found")
        author = {"reference": f"ClientApplication/{grant.client_id}"} if grant else self.admin
        trace_id = headers.get("x-trace-id") if _is_uuid(headers.get("x-trace-id")) else str(uuid.uuid4())
        letter = {("POST", 0): "c", ("GET", 0): "s", ("GET", 1): "r", ("PUT", 1): "u", ("DELETE", 1): "d",
                  ("GET", 2): "r", ("GET", 3): "r"}.get((method, len(rest)))
        if letter is None or len(rest) >= 2 and rest[1] != "_history":
            raise FHIRFailure(404 if method == "GET" else 405, "Not found", "not-supported")
        if grant:
            grant.permit(rtype, letter)
        if letter == "c":
            return self._rest_create(rtype, _resource_body(body, rtype), headers.get("If-None-Exist"), author, trace_id)
        if letter == "s":
            return 200, self._search(rtype, query), {}
        if letter == "u":
            resource = _resource_body(body, rtype)
            if resource.get("id") != rest[0]:
                raise FHIRFailure(400, "Incorrect ID", "invalid")
            stored, created = self._update(resource, author, trace_id)
            return (201 if created else 200), stored, _version_headers(stored)
        if letter == "d":
            self._delete(rtype, rest[0], author, trace_id)
            return 200, outcome("All OK", "informational", "information"), {}
        with self._lock:
            versions = list(self._history.get((rtype, rest[0]), []))
        if not versions:
            raise FHIRFailure(404, "Not found", "not-found")
        if len(rest) == 2:
            return 200, self._history_bundle(rtype, versions), {}
        if len(rest) == 3:
            found = next((v for v in versions if v.resource["meta"]["versionId"] == rest[2]), None)
            if found is None or found.deleted:
                raise FHIRFailure(404 if found is None else 410, "Not found" if found is None else "Deleted")
            return 200, found.resource, _version_headers(found.resource)
        if versions[-1].deleted:
            raise FHIRFailure(410, "Deleted", "deleted")
        return 200, versions[-1].resource, _version_headers(versions[-1].resource)

    def _rest_create(self, rtype: str, resource: dict, if_none_exist: str | None, author: dict, trace_id: str):
        with self._lock:
            if if_none_exist:  # R4 §3.1.0.8.1 conditional create
                matches = list(filter(search_filter(rtype, parse_qsl(if_none_exist)), self._live(rtype)))
                if len(matches) > 1:
                    raise FHIRFailure(412, "Multiple resources found matching condition", "multiple-matches")
                if matches:
                    return 200, matches[0], _version_headers(matches[0])
            stored = self._create(resource | {"id": str(uuid.uuid4())}, author, trace_id)
        return 201, stored, _version_headers(stored) | {
            "Location": f"{self.base_url}/{rtype}/{stored['id']}/_history/{stored['meta']['versionId']}"}

    def _search(self, rtype: str, params: list[tuple[str, str]]) -> dict:
        options = dict(params)
        try:
            count, offset = min(int(options.get("_count", 20)), 1000), int(options.get("_offset", 0))
        except ValueError:
            raise FHIRFailure(400, "Invalid _count or _offset", "invalid") from None
        matches = search_filter(rtype, params)
        with self._lock:
            found = [r for r in self._live(rtype) if matches(r)]
        for name in reversed(options.get("_sort", "").split(",") if options.get("_sort") else []):
            found.sort(key=_sort_key(rtype, name.lstrip("-")), reverse=name.startswith("-"))
        kept = [(k, v) for k, v in params if k not in ("_count", "_offset")]
        link = lambda at: f"{self.base_url}/{rtype}?{urlencode(kept + [('_count', count), ('_offset', at)])}"
        links = [{"relation": "self", "url": link(offset)}]
        if count and offset + count < len(found):
            links.append({"relation": "next", "url": link(offset + count)})
        return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset", "link": links,
                "entry": [{"fullUrl": f"{self.base_url}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                          for r in found[offset:offset + count]]}

    def _history_bundle(self, rtype: str, versions: list[Version]) -> dict:
        """R4 §3.1.0.9 history, newest first; a deleted version is a DELETE entry without a resource."""
        entries = []
        for version in reversed(versions):
            r = version.resource
            url = f"{rtype}/{r['id']}"
            method = "DELETE" if version.deleted else "PUT" if version is not versions[0] else "POST"
            entry = {"fullUrl": f"{self.base_url}/{url}", "request": {"method": method, "url": url},
                     "response": {"status": "410" if version.deleted else "200",
                                  "lastModified": r["meta"]["lastUpdated"]}}
            entries.append(entry if version.deleted else entry | {"resource": r})
        return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "history", "entry": entries}

    # -- auth --

    def _authorize(self, headers) -> Grant | None:
        given = headers.get("Authorization") or ""
        if not given and not self.auth_required:
            return None
        scheme, _, token = given.partition(" ")
        grant = self._grants.get(token) if scheme.lower() == "bearer" else None
        if grant is None or grant.expires_at <= time.time():
            raise FHIRFailure(401, "Unauthorized", "login")
        return grant

    def _token(self, headers, body: bytes) -> dict:
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        if form.get("grant_type") != "client_credentials":
            raise OAuthError(400, "unsupported_grant_type")
        client_id = self._authenticate(form, headers)
        scope, medplum = form.get("scope", ""), self.scope_semantics == "medplum"
        permissions = medplum_scopes(scope) if medplum else parse_scopes(scope) if scope else None
        token = secrets.token_urlsafe(32)
        self._grants[token] = Grant(client_id, permissions, time.time() + TOKEN_LIFETIME, medplum)
        answer = {"token_type": "Bearer", "access_token": token, "expires_in": TOKEN_LIFETIME}
        return answer | ({"scope": scope} if scope else {})

    def _authenticate(self, form: dict, headers) -> str:
        if "client_assertion" in form or "client_assertion_type" in form:
            if form.get("client_assertion_type") != ASSERTION_TYPE:
                raise OAuthError(400, "invalid_request")
            return self._verify_assertion(form.get("client_assertion", ""))
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        basic = headers.get("Authorization") or ""
        if basic[:6].lower() == "basic ":  # RFC 6749 §2.3.1: form-urlencoded id and secret, base64
            try:
                client_id, _, secret = (unquote(p) for p in base64.b64decode(basic[6:]).decode().partition(":"))
            except ValueError:
                raise OAuthError(401, "invalid_client") from None
        client = self._clients.get(client_id)
        if client is None or not client.secret or not hmac.compare_digest(client.secret.encode(), secret.encode()):
            raise OAuthError(401, "invalid_client")
        return client_id

    def _verify_assertion(self, assertion: str) -> str:
        """SMART Backend Services §"Authenticating to the Token endpoint": iss = sub = client_id, aud
        the token URL, exp at most 5 minutes ahead, a jti not seen before, signed by the client's key."""
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
            client = self._clients.get(claims.get("iss"))
            if header.get("alg") not in SIGNING_ALGS or client is None or claims.get("sub") != client.client_id:
                raise OAuthError(401, "invalid_client")
            jwk = self._jwk(client, header.get("kid"))
            if jwk.get("alg", header["alg"]) != header["alg"]:
                raise OAuthError(401, "invalid_client")
            key = jwt.PyJWK(jwk, header["alg"]).key
            verified = jwt.decode(assertion, key, algorithms=[header["alg"]], audience=self.token_url,
                                  options={"require": ["exp", "iss", "sub", "aud", "jti"]})
        except (jwt.PyJWTError, httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            raise OAuthError(401, "invalid_client") from None
        with self._lock:
            if verified["exp"] > time.time() + 300 + 5 or verified["jti"] in self._jtis:
                raise OAuthError(401, "invalid_client")
            self._jtis.add(verified["jti"])
        return client.client_id

    def _jwk(self, client: Client, kid: str | None) -> dict:
        jwks = client.jwks if client.jwks is not None else self._http.get(client.jwks_uri or "").json()
        keys = jwks.get("keys") or []
        found = [k for k in keys if k.get("kid") == kid] if kid else keys[:1] if len(keys) == 1 else []
        if not found:
            raise OAuthError(401, "invalid_client")
        return found[0]

    # -- discovery --

    def smart_configuration(self) -> dict:
        """SMART App Launch 2.x §Conformance: .well-known/smart-configuration."""
        return {"issuer": self.origin, "token_endpoint": self.token_url,
                "authorization_endpoint": self.origin + "/oauth2/authorize",
                "grant_types_supported": ["client_credentials", "authorization_code"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic",
                                                          "client_secret_post"],
                "token_endpoint_auth_signing_alg_values_supported": list(SIGNING_ALGS),
                "scopes_supported": ["system/*.read", "system/*.write", "system/*.cruds"],
                "capabilities": ["client-confidential-asymmetric", "client-confidential-symmetric",
                                 "permission-v1", "permission-v2"]}

    def capability_statement(self) -> dict:
        """No backport profile on Subscription: classic R4 Subscriptions only."""
        types = ("Patient", "Condition", "Observation", "DiagnosticReport", "DocumentReference", "Procedure",
                 "ServiceRequest", "ImagingStudy", "ClinicalImpression", "CareTeam", "Communication", "Binary",
                 "Basic", "AuditEvent", "Subscription")
        interactions = [{"code": c} for c in ("read", "vread", "update", "delete", "history-instance", "create",
                                              "search-type")]
        oauth = {"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                 "extension": [{"url": "token", "valueUri": self.token_url}]}
        return {"resourceType": "CapabilityStatement", "status": "active", "date": instant_now(), "kind": "instance",
                "software": {"name": "Medplum", "version": "4.5.2"}, "fhirVersion": "4.0.1", "format": ["json"],
                "rest": [{"mode": "server", "security": {"extension": [oauth]},
                          "resource": [{"type": t, "interaction": interactions} for t in types]}]}


def _content(resource: dict) -> dict:
    """What a write changes: everything but the server's own meta."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in SERVER_META}
    return {k: v for k, v in resource.items() if k != "meta"} | ({"meta": meta} if meta else {})


def _criteria_match(criteria: str, resource: dict) -> bool:
    rtype, _, query = criteria.partition("?")
    if rtype != resource["resourceType"]:
        return False
    try:
        return search_filter(rtype, parse_qsl(query))(resource)
    except FHIRFailure:
        return False  # criteria the server cannot evaluate match nothing


def _resource_body(body: bytes, rtype: str) -> dict:
    try:
        resource = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FHIRFailure(400, "Invalid JSON", "invalid") from None
    if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
        raise FHIRFailure(400, "Incorrect resource type", "invalid")
    return resource


def _version_headers(resource: dict) -> dict[str, str]:
    return {"ETag": f'W/"{resource["meta"]["versionId"]}"'}


def _is_uuid(value: str | None) -> bool:
    try:
        uuid.UUID(value or "")
        return True
    except ValueError:
        return False


class LocalHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server for loopback tests: daemon handler threads, no host-name lookup."""

    daemon_threads = True

    def server_bind(self) -> None:  # HTTPServer's own looks the host name up (getfqdn): slow, unneeded
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, document, headers = self.server.standin.handle(self.command, self.path, self.headers, body)
        data = json.dumps(document).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format, *args) -> None:  # the tests' output stays clean
        pass


@pytest.fixture
def medplum_standin():
    """A fresh stand-in per test, retries 1000 times faster than Medplum's (1 s -> 1 ms)."""
    with MedplumStandIn(time_scale=1e-3) as server:
        yield server
