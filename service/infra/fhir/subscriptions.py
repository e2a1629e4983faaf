"""`spinewatch subscribe`: make sure the FHIR server notifies us of every new or changed resource of
the watched types, idempotently: SPINEWATCH_SUBSCRIPTION_TYPES, Condition and Observation by default,
DocumentReference (clinical notes) where the operator adds it.

For each watched type:
1. choose the mechanism from the server's CapabilityStatement: an R5 Backport topic when the server
   supports backport Subscriptions (IG "Conformance": supportedProfile backport-subscription) and
   advertises a topic (capabilitystatement-subscriptiontopic-canonical) whose resourceTrigger is
   that type; otherwise a classic R4 criteria search (`Condition?`);
2. find our existing Subscription (tagged, same endpoint); create it when missing, update it when
   it differs from what we want (topic now offered, endpoint or secret changed), re-request it
   (status `requested`) when the server put it in `error`, ask for `active` when the server has
   left it `requested` past the grace period, and leave one that is `off` alone (someone turned it
   off on purpose: reported);
3. report each one's status as the server now sees it, and why it will send nothing when it will not.

Status (FHIR R4 Subscription.status, http://hl7.org/fhir/R4/subscription-definitions.html#Subscription.status:
"A client can only submit subscription resources in the requested or off state. Only the server can
move a subscription from requested to active"): servers differ from the letter. Medplum notifies only
`active` Subscriptions, never moves a `requested` one on, and documents creating them `active`
(https://www.medplum.com/docs/subscriptions/subscription-extensions); a `requested` one would stay
silent for ever. So SpineWatch asks for `active` first and, where the server refuses that as the
specification allows (400/422), once more with `requested`, which such a server activates itself.

The secret goes in channel.header as `Authorization: Bearer <SPINEWATCH_NOTIFICATION_TOKEN>`, which
the server sends back with every notification; with SPINEWATCH_NOTIFICATION_SIGNATURE_SECRET, also in
Medplum's subscription-secret extension, with which Medplum signs each notification (`X-Signature`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

import structlog

from service.core.errors import FHIRBadRequest, FHIRError
from service.infra.fhir.base import FHIR_JSON
from service.infra.fhir.sync import FHIRClient

log = structlog.get_logger("spinewatch.subscriptions")

WATCHED_TYPES = ("Condition", "Observation")  # the default of SPINEWATCH_SUBSCRIPTION_TYPES
BP = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
BACKPORT_PROFILE = f"{BP}/backport-subscription"
TOPIC_CANONICAL = f"{BP}/capabilitystatement-subscriptiontopic-canonical"
HEARTBEAT_PERIOD = f"{BP}/backport-heartbeat-period"
# Medplum signs each notification with this secret (X-Signature: hex HMAC-SHA256 of the body).
SECRET_EXTENSION = "https://www.medplum.com/fhir/StructureDefinition/subscription-secret"
TAG_SYSTEM = "https://spinewatch.example.org/fhir/CodeSystem/subscription"
# id-only: notifications carry references, not clinical content; the worker reads what it needs.
PAYLOAD_CONTENT = "id-only"
DELIVERY_TIMEOUT_SECONDS = 30  # backport-timeout: how long the server should wait for our answer


@dataclass
class Plan:
    resource_type: str
    mode: str  # classic | backport
    criteria: str  # a search URL (classic) or a topic canonical (backport)


@dataclass
class Report:
    resource_type: str
    mode: str
    criteria: str
    id: str | None
    status: str | None
    # created | updated | re-requested | activated | activation refused | exists | missing |
    # off (left alone) | failed
    action: str
    error: str | None = None
    asked: str | None = None  # the status SpineWatch wrote: active, or requested where the server refused active
    last_updated: str | None = None  # meta.lastUpdated of the server's view
    problem: str | None = None  # why no notifications will arrive, and what to do; None when they will

    def to_json(self) -> dict:
        return asdict(self)


# ---------------- what the server offers ----------------

def subscription_capability(capability: dict) -> tuple[bool, list[str]]:
    """(backport Subscriptions supported, topic canonicals advertised)."""
    for rest in capability.get("rest") or []:
        for resource in rest.get("resource") or []:
            if resource.get("type") != "Subscription":
                continue
            backport = BACKPORT_PROFILE in (resource.get("supportedProfile") or [])
            topics = [e.get("valueCanonical") for e in resource.get("extension") or []
                      if e.get("url") == TOPIC_CANONICAL and e.get("valueCanonical")]
            return backport, topics
    return False, []


def _sub_extensions(node: dict, suffix: str) -> list[dict]:
    # R4 servers encode SubscriptionTopic as Basic with the cross-version extensions; the IG uses
    # both the 5.0 and 4.3 extension URLs, which differ only before "extension-SubscriptionTopic".
    return [e for e in node.get("extension") or [] if str(e.get("url", "")).endswith(suffix)]


def topic_triggers(topic: dict) -> tuple[str | None, list[str]]:
    """(canonical url, resource types it triggers on) of a topic as Basic (R4) or SubscriptionTopic (R4B)."""
    if topic.get("resourceType") == "SubscriptionTopic":
        types = [str(t.get("resource", "")).rsplit("/", 1)[-1] for t in topic.get("resourceTrigger") or []]
        return topic.get("url"), types
    url = next((e.get("valueUri") for e in _sub_extensions(topic, "extension-SubscriptionTopic.url")), None)
    types = []
    for trigger in _sub_extensions(topic, "extension-SubscriptionTopic.resourceTrigger"):
        for part in trigger.get("extension") or []:
            if part.get("url") == "resource" and part.get("valueUri"):
                types.append(str(part["valueUri"]).rsplit("/", 1)[-1])
    return url, types


def discover_topics(fhir: FHIRClient, advertised: list[str]) -> dict[str, str]:
    """Resource type -> an advertised topic that triggers on it (and only on it, preferably)."""
    definitions: list[dict] = []
    for rtype, params in (("Basic", {"code": "SubscriptionTopic"}), ("SubscriptionTopic", {})):
        try:
            definitions += fhir.search_all(rtype, params | {"_count": "200"})
        except FHIRError:
            continue
    found: dict[str, str] = {}
    for topic in sorted(definitions, key=lambda t: len(topic_triggers(t)[1])):
        url, types = topic_triggers(topic)
        if url not in advertised:
            continue
        for rtype in types:
            found.setdefault(rtype, url)
    return found


def plan(fhir: FHIRClient, types: tuple[str, ...] | list[str] = WATCHED_TYPES) -> list[Plan]:
    """One Subscription per type: on a topic that triggers on it when offered, else classic criteria."""
    backport, advertised = subscription_capability(fhir.capabilities())
    topics = discover_topics(fhir, advertised) if backport and advertised else {}
    return [Plan(t, "backport", topics[t]) if t in topics else Plan(t, "classic", f"{t}?") for t in types]


# ---------------- the Subscription we want ----------------

def tag(resource_type: str) -> dict:
    return {"system": TAG_SYSTEM, "code": resource_type.lower()}


def _auth_header(settings) -> list[str]:
    return [f"Authorization: Bearer {settings.notification_token.get_secret_value()}"]


def _secret_extensions(settings) -> list[dict]:
    secret = settings.notification_signature_secret
    return [{"url": SECRET_EXTENSION, "valueString": secret.get_secret_value()}] if secret else []


def desired(p: Plan, settings) -> dict:
    channel = {"type": "rest-hook", "endpoint": settings.subscription_endpoint, "payload": FHIR_JSON,
               "header": _auth_header(settings)}
    sub = {"resourceType": "Subscription", "meta": {"tag": [tag(p.resource_type)]}, "status": "active",
           "reason": f"SpineWatch: evaluate patients with cancer when a {p.resource_type} is written",
           "criteria": p.criteria, "channel": channel}
    if extensions := _secret_extensions(settings):
        sub["extension"] = extensions
    if p.mode == "backport":
        sub["meta"]["profile"] = [BACKPORT_PROFILE]
        channel["_payload"] = {"extension": [{"url": f"{BP}/backport-payload-content", "valueCode": PAYLOAD_CONTENT}]}
        # Heartbeats twice per watchdog period: one lost heartbeat does not wake the watchdog.
        channel["extension"] = [
            {"url": HEARTBEAT_PERIOD, "valueUnsignedInt": max(1, settings.heartbeat_watchdog_seconds // 2)},
            {"url": f"{BP}/backport-timeout", "valueUnsignedInt": DELIVERY_TIMEOUT_SECONDS},
        ]
    return sub


def _ours(sub: dict, resource_type: str, endpoint: str) -> bool:
    tags = (sub.get("meta") or {}).get("tag") or []
    return any(t.get("system") == TAG_SYSTEM and t.get("code") == resource_type.lower() for t in tags) and \
        (sub.get("channel") or {}).get("endpoint") == endpoint


def _signature_secret(sub: dict) -> str | None:
    return next((e.get("valueString") for e in sub.get("extension") or [] if e.get("url") == SECRET_EXTENSION), None)


def _differs(current: dict, wanted: dict) -> bool:
    cur_channel, want_channel = current.get("channel") or {}, wanted["channel"]
    if current.get("criteria") != wanted["criteria"]:
        return True
    for key in ("type", "endpoint", "payload", "_payload"):
        if key in want_channel and cur_channel.get(key) != want_channel[key]:
            return True
    # Some servers do not return channel.header or the signature secret (secrets both); compare only
    # what they return. One that returns channel.header returns what it was given, so there a
    # missing secret extension was never written.
    if "header" not in cur_channel:
        return False
    return cur_channel["header"] != want_channel["header"] or _signature_secret(current) != _signature_secret(wanted)


def existing(fhir: FHIRClient, resource_type: str, endpoint: str) -> list[dict]:
    # `url` is the R4 search parameter on channel.endpoint; the tag check is what decides.
    return [s for s in fhir.search_all("Subscription", {"url": endpoint, "_count": "200"})
            if s.get("resourceType") == "Subscription" and _ours(s, resource_type, endpoint)]


def _restated(current: dict, settings, status: str) -> dict:
    """`current` with a new status, without the server's `error`, and with our secrets put back: a PUT
    replaces the whole resource, and the server may have left them out of what it returned."""
    sub = {k: v for k, v in current.items() if k not in ("error", "extension")} | {"status": status}
    sub["channel"] = (current.get("channel") or {}) | {"header": _auth_header(settings)}
    extensions = [e for e in current.get("extension") or [] if e.get("url") != SECRET_EXTENSION]
    if extensions := extensions + _secret_extensions(settings):
        sub["extension"] = extensions
    return sub


def re_request(fhir: FHIRClient, current: dict, settings) -> dict:
    """Ask the server to re-activate a Subscription it put in `error` (R4 Subscription.status: the
    client sets `requested`; a server that leaves it there is then asked for `active`, see activate)."""
    again = _restated(current, settings, "requested")
    updated = fhir.update(again)
    log.warning("subscription.re_requested", subscription=f"Subscription/{current.get('id')}")
    return updated or again


def activate(fhir: FHIRClient, current: dict, settings) -> dict:
    """Ask for `active` a Subscription the server has left `requested` past the grace period
    (Medplum never activates one itself). Raises FHIRBadRequest when the server refuses (400/422)."""
    wanted = _restated(current, settings, "active")
    updated = fhir.update(wanted)
    log.warning("subscription.activated", subscription=f"Subscription/{current.get('id')}")
    return updated or wanted


def _write(write, sub: dict) -> tuple[dict, str]:
    """Create or update as `active`; a server that refuses that (400/422: R4 lets the client submit
    only `requested` or `off`) is asked once more with `requested`. (answer, the status asked for)"""
    try:
        return write(sub | {"status": "active"}) or sub, "active"
    except FHIRBadRequest as exc:
        log.info("subscription.active_refused", criteria=sub["criteria"], status=exc.status)
    again = sub | {"status": "requested"}
    return write(again) or again, "requested"


# ---------------- is it delivering? ----------------

def parse_instant(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def requested_since(sub: dict) -> datetime | None:
    """When a `requested` Subscription was last written (meta.lastUpdated): a server that activates
    one writes it again, so this is how long it has waited. None: not requested, or the server keeps
    no meta.lastUpdated."""
    return parse_instant((sub.get("meta") or {}).get("lastUpdated")) if sub.get("status") == "requested" else None


def stuck_requested(status: str | None, since: datetime | None, now: datetime, grace: timedelta) -> bool:
    return status == "requested" and since is not None and now - since >= grace


def sends_heartbeats(sub: dict) -> bool:
    """Only a backport Subscription with a heartbeat period does (IG backport-heartbeat-period); a
    classic R4 one never does, so its silence means only that nothing changed."""
    return any(e.get("url") == HEARTBEAT_PERIOD and (e.get("valueUnsignedInt") or 0) > 0
               for e in (sub.get("channel") or {}).get("extension") or [])


def watched_type(sub: dict, types: tuple[str, ...] | list[str]) -> str | None:
    """The resource type (one of `types`) one of our Subscriptions watches, from our tag."""
    codes = {t.get("code") for t in (sub.get("meta") or {}).get("tag") or [] if t.get("system") == TAG_SYSTEM}
    return next((t for t in types if t.lower() in codes), None)


def delivery_problem(status: str | None, since: datetime | None, now: datetime, grace: timedelta) -> str | None:
    """Why a Subscription in this state sends no notifications, and what to do. None when it is
    `active`, or `requested` within the grace period (the server may still activate it)."""
    if status == "active" or (status == "requested" and not stuck_requested(status, since, now, grace)):
        return None
    if status == "requested":
        minutes = int((now - since).total_seconds() // 60)
        return (f"the server has left it `requested` for {minutes} min: no notifications will arrive (servers "
                "such as Medplum notify only `active` ones); `spinewatch subscribe` asks for `active`")
    if status == "error":
        return ("the server put it in `error`: no notifications will arrive until it is active again; "
                "`spinewatch subscribe` (or the watchdog) re-requests it")
    if status == "off":
        return ("turned off on the server: no notifications will arrive; switch it on there, or delete it "
                "and run `spinewatch subscribe`")
    if status is None:
        return "not on the server: no notifications will arrive; run `spinewatch subscribe`"
    return f"status `{status}` is not `active`: no notifications will arrive; run `spinewatch subscribe`"


# ---------------- ensure ----------------

def ensure(fhir: FHIRClient, settings, *, check_only: bool = False, now: datetime | None = None) -> list[Report]:
    now = now or datetime.now(timezone.utc)
    reports = []
    for p in plan(fhir, settings.subscribed_types):
        wanted = desired(p, settings)
        try:
            reports.append(_ensure_one(fhir, p, wanted, settings, check_only, now))
        except FHIRError as exc:
            reports.append(Report(p.resource_type, p.mode, p.criteria, None, None, "failed", exc.message))
    return reports


def _ensure_one(fhir: FHIRClient, p: Plan, wanted: dict, settings, check_only: bool, now: datetime) -> Report:
    grace = timedelta(seconds=settings.subscription_activation_grace_seconds)
    found = existing(fhir, p.resource_type, settings.subscription_endpoint)
    if not found:
        if check_only:
            return Report(p.resource_type, p.mode, p.criteria, None, None, "missing",
                          problem=delivery_problem(None, None, now, grace))
        created, asked = _write(fhir.create, wanted)
        return _report(fhir, p, created, "created", now, grace, asked=asked)
    current, extra = found[0], found[1:]
    if extra:  # harmless (notifications are de-duplicated) but worth saying
        log.warning("subscription.duplicates", type=p.resource_type, count=len(extra))
    status, asked, error = current.get("status"), None, None
    if check_only:
        action = "exists"
    elif status == "off":
        action = "off (left alone)"
    elif _differs(current, wanted):
        current, asked = _write(fhir.update, wanted | {"id": current["id"]})
        action = "updated"
    elif status == "error":
        current, asked, action = re_request(fhir, current, settings), "requested", "re-requested"
    elif stuck_requested(status, requested_since(current), now, grace):
        try:
            current, asked, action = activate(fhir, current, settings), "active", "activated"
        except FHIRBadRequest as exc:
            action, error = "activation refused", exc.message
            log.warning("subscription.activation_refused", subscription=f"Subscription/{current.get('id')}",
                        status=exc.status)
    else:
        action = "exists"
    return _report(fhir, p, current, action, now, grace, asked=asked, error=error)


def _report(fhir: FHIRClient, p: Plan, sub: dict, action: str, now: datetime, grace: timedelta, *,
            asked: str | None = None, error: str | None = None) -> Report:
    # The answer to a create/update may echo the request (status `requested`, as sekmet does); the
    # server's own view is what to report.
    sid = sub.get("id")
    try:
        sub = fhir.read("Subscription", sid) if sid else sub
    except FHIRError:
        pass
    status = sub.get("status")
    problem = delivery_problem(status, requested_since(sub), now, grace)
    if problem and action == "activation refused":
        problem += f"; the server refused `active` ({error}): have it activated on the server"
    server_error = sub.get("error") if isinstance(sub.get("error"), str) else None
    return Report(p.resource_type, p.mode, p.criteria, sid, status, action, error or server_error, asked,
                  (sub.get("meta") or {}).get("lastUpdated"), problem)
