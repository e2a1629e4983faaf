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
   (status `requested`) when the server put it in `error` (R4 Subscription status: the client sets
   `requested` to ask for it to be re-activated), and leave one that is `off` alone (someone turned
   it off on purpose: reported);
3. report each one's status.

The secret goes in channel.header as `Authorization: Bearer <SPINEWATCH_NOTIFICATION_TOKEN>`, which
the server sends back with every notification.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import structlog

from service.core.errors import FHIRError
from service.infra.fhir.base import FHIR_JSON
from service.infra.fhir.sync import FHIRClient

log = structlog.get_logger("spinewatch.subscriptions")

WATCHED_TYPES = ("Condition", "Observation")  # the default of SPINEWATCH_SUBSCRIPTION_TYPES
BP = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
BACKPORT_PROFILE = f"{BP}/backport-subscription"
TOPIC_CANONICAL = f"{BP}/capabilitystatement-subscriptiontopic-canonical"
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
    action: str  # created | updated | re-requested | exists | off (left alone) | failed
    error: str | None = None

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


def desired(p: Plan, settings) -> dict:
    channel = {"type": "rest-hook", "endpoint": settings.subscription_endpoint, "payload": FHIR_JSON,
               "header": [f"Authorization: Bearer {settings.notification_token.get_secret_value()}"]}
    sub = {"resourceType": "Subscription", "meta": {"tag": [tag(p.resource_type)]}, "status": "requested",
           "reason": f"SpineWatch: evaluate patients with cancer when a {p.resource_type} is written",
           "criteria": p.criteria, "channel": channel}
    if p.mode == "backport":
        sub["meta"]["profile"] = [BACKPORT_PROFILE]
        channel["_payload"] = {"extension": [{"url": f"{BP}/backport-payload-content", "valueCode": PAYLOAD_CONTENT}]}
        # Heartbeats twice per watchdog period: one lost heartbeat does not wake the watchdog.
        channel["extension"] = [
            {"url": f"{BP}/backport-heartbeat-period",
             "valueUnsignedInt": max(1, settings.heartbeat_watchdog_seconds // 2)},
            {"url": f"{BP}/backport-timeout", "valueUnsignedInt": DELIVERY_TIMEOUT_SECONDS},
        ]
    return sub


def _ours(sub: dict, resource_type: str, endpoint: str) -> bool:
    tags = (sub.get("meta") or {}).get("tag") or []
    return any(t.get("system") == TAG_SYSTEM and t.get("code") == resource_type.lower() for t in tags) and \
        (sub.get("channel") or {}).get("endpoint") == endpoint


def _differs(current: dict, wanted: dict) -> bool:
    cur_channel, want_channel = current.get("channel") or {}, wanted["channel"]
    if current.get("criteria") != wanted["criteria"]:
        return True
    for key in ("type", "endpoint", "payload", "_payload"):
        if key in want_channel and cur_channel.get(key) != want_channel[key]:
            return True
    # Some servers do not return channel.header (it holds a secret); compare only when they do.
    return "header" in cur_channel and cur_channel["header"] != want_channel["header"]


def existing(fhir: FHIRClient, resource_type: str, endpoint: str) -> list[dict]:
    # `url` is the R4 search parameter on channel.endpoint; the tag check is what decides.
    return [s for s in fhir.search_all("Subscription", {"url": endpoint, "_count": "200"})
            if s.get("resourceType") == "Subscription" and _ours(s, resource_type, endpoint)]


def re_request(fhir: FHIRClient, current: dict) -> dict:
    """Ask the server to re-activate a Subscription it put in `error`."""
    again = {k: v for k, v in current.items() if k != "error"} | {"status": "requested"}
    updated = fhir.update(again)
    log.warning("subscription.re_requested", subscription=f"Subscription/{current.get('id')}")
    return updated or again


# ---------------- ensure ----------------

def ensure(fhir: FHIRClient, settings, *, check_only: bool = False) -> list[Report]:
    reports = []
    for p in plan(fhir, settings.subscribed_types):
        wanted = desired(p, settings)
        try:
            reports.append(_ensure_one(fhir, p, wanted, settings.subscription_endpoint, check_only))
        except FHIRError as exc:
            reports.append(Report(p.resource_type, p.mode, p.criteria, None, None, "failed", exc.message))
    return reports


def _ensure_one(fhir: FHIRClient, p: Plan, wanted: dict, endpoint: str, check_only: bool) -> Report:
    found = existing(fhir, p.resource_type, endpoint)
    if not found:
        if check_only:
            return Report(p.resource_type, p.mode, p.criteria, None, None, "missing")
        created = fhir.create(wanted)
        return _report(fhir, p, created, "created")
    current, extra = found[0], found[1:]
    if extra:  # harmless (notifications are de-duplicated) but worth saying
        log.warning("subscription.duplicates", type=p.resource_type, count=len(extra))
    status = current.get("status")
    if check_only:
        action = "exists"
    elif status == "off":
        action = "off (left alone)"
    elif _differs(current, wanted):
        current = fhir.update(wanted | {"id": current["id"]}) or current
        action = "updated"
    elif status == "error":
        current = re_request(fhir, current)
        action = "re-requested"
    else:
        action = "exists"
    return _report(fhir, p, current, action)


def _report(fhir: FHIRClient, p: Plan, sub: dict, action: str) -> Report:
    # The answer to a create/update may echo the request (status `requested`, as sekmet does); the
    # server's own view is what to report.
    sid = sub.get("id")
    try:
        sub = fhir.read("Subscription", sid) if sid else sub
    except FHIRError:
        pass
    return Report(p.resource_type, p.mode, p.criteria, sid, sub.get("status"), action,
                  sub.get("error") if isinstance(sub.get("error"), str) else None)
