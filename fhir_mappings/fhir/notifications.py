"""Subscription notifications → what happened and what to do about it. Pure: no web, queue, HTTP
or Redis; the service and the workers act on what this returns.

Two wire shapes arrive:

- **R4 classic rest-hook** (FHIR R4 Subscription §2.46.7.1): with a payload, the server PUTs (or
  POSTs) the resource to `{endpoint}/{type}/{id}`; without one it POSTs an empty body to the
  endpoint, a bare "something changed" ping.
- **Subscriptions R5 Backport IG** (topic-based, on R4): a `history` Bundle whose first entry is the
  SubscriptionStatus: an R4 `Parameters` (profile backport-subscription-status-r4, kebab-case
  parameter names) or, from R4B servers, a `SubscriptionStatus` resource. `type` says what it is:
  `handshake`, `heartbeat`, `event-notification`, `query-status` (a $status answer) or `query-event`
  (an $events answer). The payload content decides what else is inside (IG "Payload Types"):
  `empty` (event numbers only), `id-only` (focus references; entries with a fullUrl and no
  resource) or `full-resource` (the resources themselves).

Deletes (R4 Subscription §2.46 notifies on create and update only, so each server has its own shape):

- **Medplum** POSTs `{}` to the endpoint with `X-Medplum-Interaction: delete` and
  `X-Medplum-Deleted-Resource: Type/id` (Medplum docs, "Subscription Extensions": interactions;
  packages/server/src/workers/subscription.ts, buildRestHookHeaders). Its other headers name the
  Subscription (`X-Medplum-Subscription`, a bare id) and the write (`x-trace-id`, kept in the job, so
  every retry repeats it); `Delivery` carries them.
- **HAPI FHIR** with `channel.payload` set sends an HTTP `DELETE {endpoint}/{type}/{id}`
  (SubscriptionDeliveringRestHookSubscriber.createDeliveryRequestNormal: `client.delete().resourceById`;
  only for Subscriptions with the extension http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages).
- **Backport IG** notifications: a history Bundle entry's `request` is "filled out in a way that makes
  sense" for the event (IG "Notifications", Bundle Type Considerations) and a full-resource entry
  without its resource carries `request`/`response` (IG "Payload Types"); HAPI's topic Subscriptions
  put a deleted focus in as an entry with `request.method` DELETE, `request.url` Type/id and no
  resource (SubscriptionTopicPayloadBuilder, BundleBuilder.addTransactionDeleteEntry). Firely's
  shape was not verified.

`parse_notification` / `parse_post` / `parse_rest_hook` / `ping` return a `Notification` (parse_post
and parse_rest_hook given the `Delivery` that `delivery_headers` reads); `Notification.work()` says
for each event which patient to evaluate (when the payload names one), which references must be
read first (when it does not), or that the server must be asked what happened (empty payloads), and
under which keys a repeat of the same event is recognised.

Over 300 lines on purpose: one parser per wire shape above, all returning the same `Notification`;
split across files, the shapes a server may send would no longer be readable side by side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from fhir_mappings.fhir.bundle import patient_key

CONTROL_KINDS = ("handshake", "heartbeat", "query-status")
EVENT_KINDS = ("event-notification", "query-event")
BACKPORT_KINDS = CONTROL_KINDS + EVENT_KINDS
# Bundle.type of a notification: `history` in R4/R4B (backport IG), `subscription-notification` in R5.
NOTIFICATION_BUNDLE_TYPES = ("history", "subscription-notification")

# FHIR R4 §2.1.0.1 (id: [A-Za-z0-9\-\.]{1,64}); resource type names are UpperCamelCase.
_TYPE = r"[A-Z][A-Za-z]{1,63}"
_ID = r"[A-Za-z0-9\-.]{1,64}"
_REFERENCE = re.compile(rf"(?:^|/)({_TYPE})/({_ID})(?:/_history/({_ID}))?/?$")
TYPE_PATTERN = re.compile(rf"^{_TYPE}$")
ID_PATTERN = re.compile(rf"^{_ID}$")
RESOURCE_PATTERN = re.compile(rf"^{_TYPE}/{_ID}$")
# A trace id is kept in the audit record: a uuid or a W3C traceparent fits; anything else is dropped.
TRACE_PATTERN = re.compile(r"^[A-Za-z0-9\-._]{1,128}$")
INTERACTIONS = ("create", "update", "delete")
# Medplum's rest-hook headers (packages/server/src/workers/subscription.ts, buildRestHookHeaders).
SUBSCRIPTION_HEADER = "X-Medplum-Subscription"
INTERACTION_HEADER = "X-Medplum-Interaction"
DELETED_HEADER = "X-Medplum-Deleted-Resource"
TRACE_HEADER = "x-trace-id"


class NotificationError(ValueError):
    """The body is not a notification we can act on. The message names the part, never a value."""


@dataclass(frozen=True)
class NotificationEvent:
    number: int | None  # eventNumber: per subscription, 1, 2, 3 ... (IG "Event Numbers")
    timestamp: str | None
    focus: str | None  # "Type/id", the resource that triggered the event; None in empty payloads
    focus_version: str | None  # from `_history/N` in the reference or the included resource's meta
    context: tuple[str, ...] = ()  # additional-context references, "Type/id"
    deleted: bool = False  # the event is the focus's deletion


@dataclass(frozen=True)
class WorkItem:
    """One event's worth of work. `keys` identify it for de-duplication (empty: cannot be told apart
    from a repeat, e.g. a ping); exactly one of patient / resolve / catch_up says what to do."""

    keys: tuple[str, ...]
    patient: str | None = None  # evaluate this patient ("Patient/id")
    focus: tuple[str, ...] = ()  # references the worker re-reads at their current version
    resolve: bool = False  # the patient is not known: read `focus` to find it
    catch_up: bool = False  # nothing named: ask the server what happened ($events, _lastUpdated)
    event_number: int | None = None
    deleted: bool = False  # `focus` was deleted: it can no longer be read at its current version


@dataclass
class Notification:
    kind: str  # one of BACKPORT_KINDS, "rest-hook" or "ping"
    subscription: str | None = None  # "Subscription/id"
    topic: str | None = None
    status: str | None = None  # the Subscription's status as the server sees it
    events_since_start: int | None = None
    events: list[NotificationEvent] = field(default_factory=list)
    resources: dict[str, dict] = field(default_factory=dict)  # "Type/id" -> included resource
    errors: list[str] = field(default_factory=list)  # subscription error codes (query-status)
    warnings: list[str] = field(default_factory=list)  # non-conformance we accept; no values
    interaction: str | None = None  # create | update | delete, when the delivery says
    trace: str | None = None  # the server's id of the write (Medplum x-trace-id)

    @property
    def is_control(self) -> bool:
        return self.kind in CONTROL_KINDS

    @property
    def event_numbers(self) -> list[int]:
        return sorted({e.number for e in self.events if e.number is not None})

    @property
    def deleted(self) -> list[str]:
        return sorted({e.focus for e in self.events if e.deleted and e.focus})

    def work(self) -> list[WorkItem]:
        if self.kind == "ping":
            return [WorkItem(keys=(), catch_up=True)]
        if self.kind not in ("rest-hook",) + EVENT_KINDS:
            return []
        items = [self._work_for(event) for event in self.events]
        if not items and self.kind == "event-notification":
            # An event-notification without notification-event parts (non-conformant): all we know
            # is that something happened; events-since-subscription-start names it when present.
            number = self.events_since_start
            keys = (event_key(self.subscription, number),) if self.subscription and number is not None else ()
            items = [WorkItem(keys=keys, catch_up=True, event_number=number)]
        return items

    def _work_for(self, event: NotificationEvent) -> WorkItem:
        keys: list[str] = []
        if self.subscription and event.number is not None:
            keys.append(event_key(self.subscription, event.number))
        if event.focus is None:
            return WorkItem(keys=tuple(keys), catch_up=True, event_number=event.number)
        included = self.resources.get(event.focus)
        keys.extend(self._delete_keys(event) if event.deleted else self._write_keys(event, included))
        patient = self._patient_of(event, included)
        return WorkItem(keys=tuple(keys), patient=patient, focus=(event.focus,), resolve=patient is None,
                        event_number=event.number, deleted=event.deleted)

    @staticmethod
    def _write_keys(event: NotificationEvent, included: dict | None) -> list[str]:
        if event.focus_version:
            return [version_key(event.focus, event.focus_version)]
        if included is not None and (included.get("meta") or {}).get("lastUpdated"):
            # No versionId: the server's lastUpdated instant tells one write from the next.
            return [f"updated:{event.focus}:{included['meta']['lastUpdated']}"]
        return []

    def _delete_keys(self, event: NotificationEvent) -> list[str]:
        # Not version_key: a delete that carries the last version would be taken for the update that
        # wrote it. Without a version or a trace id nothing tells this delete from a later one of the
        # same id (re-created, deleted again), so no key: a repeat costs one more evaluation, whereas
        # a dropped delete would leave the deleted resource in the patient's assessment.
        if event.focus_version:
            return [delete_key(event.focus, event.focus_version)]
        if self.trace:
            return [delete_key(event.focus, f"trace:{self.trace}")]
        return []

    def _patient_of(self, event: NotificationEvent, included: dict | None) -> str | None:
        if event.focus and event.focus.startswith("Patient/"):
            return event.focus
        if included is not None:
            found = patient_key(included)
            if found:
                return found
        # sekmet and others name the focus's subject as additional-context (IG: "resources that
        # provide context"); a Patient there is the patient the event is about.
        patients = sorted({ref for ref in event.context if ref.startswith("Patient/")})
        if len(patients) == 1:
            return patients[0]
        return None


def event_key(subscription: str, number: int) -> str:
    return f"event:{subscription}:{number}"


def version_key(reference: str, version: str) -> str:
    return f"version:{reference}:{version}"


def delete_key(reference: str, marker: str) -> str:
    return f"deleted:{reference}:{marker}"


def relative_reference(reference: object) -> tuple[str, str | None] | None:
    """An absolute or relative literal reference → ("Type/id", versionId or None); None for
    anything else (urn:uuid, contained "#x", logical-only references)."""
    if not isinstance(reference, str):
        return None
    match = _REFERENCE.search(reference.split("?", 1)[0].split("#", 1)[0])
    if not match:
        return None
    return f"{match.group(1)}/{match.group(2)}", match.group(3)


@dataclass(frozen=True)
class Delivery:
    """What a notification's request says besides its body (Medplum's headers; an HTTP DELETE), each
    checked for syntax. A header we cannot use is left out with a warning; only a deleted-resource
    header we cannot read is refused, since it alone says what the notification is about."""

    subscription: str | None = None  # "Subscription/<id>"
    interaction: str | None = None  # create | update | delete
    deleted: str | None = None  # "Type/id"
    trace: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def is_delete(self) -> bool:
        return self.interaction == "delete" or self.deleted is not None


def delivery_headers(headers: Mapping[str, str]) -> Delivery:
    """Medplum's rest-hook headers → Delivery. Names are case-insensitive (RFC 9110 §5.1)."""
    values = {name.lower(): value.strip() for name, value in headers.items()}
    warnings: list[str] = []

    def checked(name: str, valid) -> str | None:
        value = values.get(name.lower())
        if value is None or valid(value):
            return value
        warnings.append(f"{name} header ignored (not a valid value)")
        return None

    subscription = checked(SUBSCRIPTION_HEADER, ID_PATTERN.match)
    interaction = checked(INTERACTION_HEADER, lambda v: v.lower() in INTERACTIONS)
    deleted = values.get(DELETED_HEADER.lower())
    if deleted is not None and not RESOURCE_PATTERN.match(deleted):
        raise NotificationError(f"the {DELETED_HEADER} header must be a reference Type/id")
    return Delivery(subscription=f"Subscription/{subscription}" if subscription else None,
                    interaction=interaction.lower() if interaction else None, deleted=deleted,
                    trace=checked(TRACE_HEADER, TRACE_PATTERN.match), warnings=tuple(warnings))


def ping() -> Notification:
    """R4 rest-hook without payload: an empty POST that says only that something changed."""
    return Notification(kind="ping")


def parse_post(body: object | None, delivery: Delivery = Delivery()) -> Notification:
    """POST {endpoint}: a backport Bundle, a resource (servers that POST rather than PUT, as Medplum
    always does), a Medplum delete, or a ping. `{}` without a delete header names nothing: it is
    read as a ping (the sweep finds what changed) rather than refused, since a refusal would be
    retried by the server for days (Medplum: 18 attempts over about 73 hours) and change nothing."""
    if delivery.deleted:
        note = _deleted(delivery.deleted, _matching_resource(body, delivery.deleted, DELETED_HEADER))
    elif body is None or body == {}:
        note = ping()
        if delivery.is_delete:
            note.warnings.append(f"{INTERACTION_HEADER}: delete without {DELETED_HEADER}: read as a ping")
        elif body == {}:
            note.warnings.append("an empty JSON object without a delete header: read as a ping")
    else:
        note = parse_resource(body)
        if delivery.is_delete and note.kind == "rest-hook":  # the resource's last version, deleted
            note.events = [replace(e, deleted=True) for e in note.events]
    return _with_delivery(note, delivery)


def parse_rest_hook(resource_type: str, resource_id: str, body: object | None,
                    delivery: Delivery = Delivery()) -> Notification:
    """R4 rest-hook with payload: `PUT {endpoint}/{type}/{id}` carrying the resource (R4 §2.46.7.1);
    an empty body (or `{}`) there still names the resource, which is then read. A delete (HAPI's
    HTTP DELETE, or Medplum's headers on this path) may carry the last version."""
    if not TYPE_PATTERN.match(resource_type) or not ID_PATTERN.match(resource_id):
        raise NotificationError("the path must be /{resourceType}/{id} with a FHIR type and id")
    focus = f"{resource_type}/{resource_id}"
    if delivery.deleted not in (None, focus):
        raise NotificationError(f"the {DELETED_HEADER} header differs from the path")
    resource = _matching_resource(body, focus, "the path")
    if delivery.is_delete:
        note = _deleted(focus, resource)
    elif resource is None:
        note = Notification(kind="rest-hook", events=[NotificationEvent(None, None, focus, None)])
    else:
        note = _resource_notification(resource)
    return _with_delivery(note, delivery)


def _matching_resource(body: object | None, focus: str, where: str) -> dict | None:
    """The body's resource, which must be `focus`; None for an empty body or `{}`."""
    if body is None or body == {}:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise NotificationError("the body must be a FHIR resource (no resourceType)")
    resource_type, resource_id = focus.split("/", 1)
    if body["resourceType"] != resource_type:
        raise NotificationError(f"the body's resourceType differs from {where}")
    if body.get("id") not in (None, resource_id):
        raise NotificationError(f"the body's id differs from {where}")
    return {**body, "id": resource_id}


def parse_resource(body: object) -> Notification:
    """A Bundle → backport notification; any other resource → an R4 rest-hook payload POSTed to the
    endpoint itself (servers configured to POST rather than PUT)."""
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise NotificationError("not a FHIR resource (no resourceType)")
    if body["resourceType"] == "Bundle":
        return parse_notification(body)
    if not isinstance(body.get("id"), str) or not ID_PATTERN.match(body["id"]):
        raise NotificationError(f"a {body['resourceType']} payload without a valid id")
    return _resource_notification(body)


def _resource_notification(resource: dict, *, deleted: bool = False) -> Notification:
    focus = f"{resource['resourceType']}/{resource['id']}"
    version = (resource.get("meta") or {}).get("versionId")
    event = NotificationEvent(None, None, focus, version if isinstance(version, str) else None, deleted=deleted)
    return Notification(kind="rest-hook", events=[event], resources={focus: resource})


def _deleted(focus: str, last_version: dict | None) -> Notification:
    if last_version is not None:
        return _resource_notification(last_version, deleted=True)
    return Notification(kind="rest-hook", events=[NotificationEvent(None, None, focus, None, deleted=True)])


def _with_delivery(note: Notification, delivery: Delivery) -> Notification:
    if delivery.subscription and note.subscription not in (None, delivery.subscription):
        note.warnings.append(f"{SUBSCRIPTION_HEADER} differs from the notification's subscription: ignored")
    note.subscription = note.subscription or delivery.subscription
    note.interaction = delivery.interaction or ("delete" if note.deleted else None)
    note.trace = delivery.trace
    note.warnings.extend(delivery.warnings)
    return note


def parse_notification(bundle: object) -> Notification:
    """A backport notification Bundle (or a $status / $events answer) → Notification."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise NotificationError("a notification must be a Bundle")
    warnings: list[str] = []
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise NotificationError("the notification Bundle has no entries (the first must be the SubscriptionStatus)")
    if not all(isinstance(e, dict) for e in entries):
        raise NotificationError("Bundle.entry must be a list of objects")
    if bundle.get("type") not in NOTIFICATION_BUNDLE_TYPES + ("searchset",):
        warnings.append("Bundle.type is not history (IG: notifications are history Bundles)")
    first = entries[0]
    status = first.get("resource")
    if not isinstance(status, dict):
        raise NotificationError("Bundle.entry[0] has no resource (the SubscriptionStatus)")
    if status.get("resourceType") == "Parameters":
        note = _from_parameters(status)
    elif status.get("resourceType") == "SubscriptionStatus":
        note = _from_subscription_status(status)
    else:
        raise NotificationError("Bundle.entry[0].resource must be a Parameters (R4 backport) or a SubscriptionStatus (R4B)")
    if bundle.get("type") == "history":
        # R4 Bundle invariants bdl-3/bdl-4: history entries carry request and response; the IG has
        # the first one be the GET of Subscription/{id}/$status. Their absence changes nothing we read.
        for index, entry in enumerate(entries):
            if "request" not in entry or "response" not in entry:
                warnings.append(f"Bundle.entry[{index}] lacks request/response (R4 bdl-3/bdl-4, history Bundle)")
    note.warnings = warnings + note.warnings
    _collect_entries(note, entries[1:])
    deleted = _deleted_entries(entries[1:])
    note.events = [replace(e, deleted=True) if e.focus in deleted else e for e in note.events]
    return note


def _deleted_entries(entries: list[dict]) -> set[str]:
    """Entries whose request is a DELETE (the IG leaves the request to fit the event; HAPI writes a
    deleted focus as DELETE Type/id without a resource): the references deleted."""
    deleted = set()
    for entry in entries:
        request = entry.get("request")
        if isinstance(request, dict) and str(request.get("method")).upper() == "DELETE":
            found = relative_reference(request.get("url")) or relative_reference(entry.get("fullUrl"))
            if found:
                deleted.add(found[0])
    return deleted


def _collect_entries(note: Notification, entries: list[dict]) -> None:
    for entry in entries:
        resource = entry.get("resource")
        if isinstance(resource, dict):
            rtype, rid = resource.get("resourceType"), resource.get("id")
            if isinstance(rtype, str) and isinstance(rid, str):
                note.resources[f"{rtype}/{rid}"] = resource
                continue
            found = relative_reference(entry.get("fullUrl"))
            if found and isinstance(rtype, str) and found[0].startswith(rtype + "/"):
                note.resources[found[0]] = {**resource, "id": found[0].split("/", 1)[1]}
        # id-only entries (fullUrl, no resource) add nothing beyond the focus references.


def _value(param: dict):
    for key, value in param.items():
        if key.startswith("value"):
            return value
    return None


def _norm(name: object) -> str:
    # The IG's R4 profile uses kebab-case (events-since-subscription-start); some senders use the
    # R4B element names (eventsSinceSubscriptionStart). Both name the same thing.
    return name.replace("-", "").lower() if isinstance(name, str) else ""


def _integer(value, what: str) -> int | None:
    # The IG types event numbers as string (R4 has no integer64); R4B/R5 senders may use numbers.
    if value is None:
        return None
    if isinstance(value, bool):
        raise NotificationError(f"{what} must be a non-negative integer")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise NotificationError(f"{what} must be a non-negative integer")


def _reference(value, what: str) -> tuple[str, str | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise NotificationError(f"{what} must be a Reference")
    return relative_reference(value.get("reference"))


def _from_parameters(parameters: dict) -> Notification:
    params = parameters.get("parameter")
    if not isinstance(params, list) or not all(isinstance(p, dict) for p in params):
        raise NotificationError("the SubscriptionStatus Parameters has no parameter list")
    by_name: dict[str, list[dict]] = {}
    for p in params:
        by_name.setdefault(_norm(p.get("name")), []).append(p)

    def one(name: str):
        found = by_name.get(name) or []
        return _value(found[0]) if found else None

    events: list[NotificationEvent] = []
    for p in by_name.get("notificationevent", []):
        parts: dict[str, list] = {}
        for part in p.get("part") or []:
            if isinstance(part, dict):
                parts.setdefault(_norm(part.get("name")), []).append(_value(part))
        events.append(_event(
            number=(parts.get("eventnumber") or [None])[0],
            timestamp=(parts.get("timestamp") or [None])[0],
            focus=(parts.get("focus") or [None])[0],
            context=parts.get("additionalcontext") or [],
        ))
    errors = [_codes(one_error) for one_error in (_value(p) for p in by_name.get("error", []))]
    return _notification(
        kind=one("type"), subscription=one("subscription"), topic=one("topic"), status=one("status"),
        events_since_start=one("eventssincesubscriptionstart"), events=events,
        errors=[c for c in errors if c])


def _from_subscription_status(status: dict) -> Notification:
    events = []
    for e in status.get("notificationEvent") or []:
        if not isinstance(e, dict):
            raise NotificationError("SubscriptionStatus.notificationEvent must be a list of objects")
        events.append(_event(number=e.get("eventNumber"), timestamp=e.get("timestamp"), focus=e.get("focus"),
                             context=e.get("additionalContext") or []))
    errors = [_codes(c) for c in status.get("error") or []]
    return _notification(
        kind=status.get("type"), subscription=status.get("subscription"), topic=status.get("topic"),
        status=status.get("status"), events_since_start=status.get("eventsSinceSubscriptionStart"),
        events=events, errors=[c for c in errors if c])


def _codes(concept) -> str | None:
    if not isinstance(concept, dict):
        return None
    codes = [c.get("code") for c in concept.get("coding") or [] if isinstance(c, dict) and isinstance(c.get("code"), str)]
    return ",".join(codes) or None


def _event(number, timestamp, focus, context) -> NotificationEvent:
    focus_ref = _reference(focus, "notification-event.focus")
    if focus is not None and focus_ref is None:
        raise NotificationError("notification-event.focus is not a literal reference to a resource")
    refs = [_reference(c, "notification-event.additional-context") for c in context]
    return NotificationEvent(
        number=_integer(number, "notification-event.event-number"),
        timestamp=timestamp if isinstance(timestamp, str) else None,
        focus=focus_ref[0] if focus_ref else None,
        focus_version=focus_ref[1] if focus_ref else None,
        context=tuple(r[0] for r in refs if r),
    )


def _notification(kind, subscription, topic, status, events_since_start, events, errors) -> Notification:
    if kind not in BACKPORT_KINDS:
        raise NotificationError("SubscriptionStatus.type must be one of " + ", ".join(BACKPORT_KINDS))
    sub = _reference(subscription, "SubscriptionStatus.subscription")
    if sub is None or not sub[0].startswith("Subscription/"):
        raise NotificationError("SubscriptionStatus.subscription must reference a Subscription")
    if status is not None and not isinstance(status, str):
        raise NotificationError("SubscriptionStatus.status must be a code")
    return Notification(
        kind=kind, subscription=sub[0], topic=topic if isinstance(topic, str) else None, status=status,
        events_since_start=_integer(events_since_start, "events-since-subscription-start"),
        events=events, errors=errors)


def parse_status_bundle(bundle: object) -> list[Notification]:
    """A `$status` answer: a searchset Bundle with one SubscriptionStatus per Subscription (IG
    OperationDefinition backport-subscription-status)."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise NotificationError("a $status answer must be a Bundle")
    out = []
    for entry in bundle.get("entry") or []:
        if not isinstance(entry, dict) or (entry.get("search") or {}).get("mode") == "outcome":
            continue
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") in ("Parameters", "SubscriptionStatus"):
            out.append(parse_notification({"resourceType": "Bundle", "type": "history",
                                           "entry": [{"resource": resource, "request": {}, "response": {}}]}))
    return out


def missing_event_numbers(highest_seen: int | None, numbers: list[int], events_since_start: int | None) -> list[int]:
    """Event numbers that should have arrived and have not (IG "Event Numbers": consecutive per
    subscription). `highest_seen` None: we never heard of this subscription, so nothing is known
    to be missing. `numbers`: the events in this notification; `events_since_start`: the server's
    count, which heartbeats and $status also carry."""
    if highest_seen is None:
        return []
    top = max([highest_seen, *numbers, events_since_start or 0])
    return [n for n in range(highest_seen + 1, top + 1) if n not in set(numbers)]
