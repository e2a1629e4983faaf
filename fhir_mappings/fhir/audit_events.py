"""Audit log records → FHIR R4 AuditEvent resources shaped by IHE Basic Audit Log Patterns (BALP 1.1).

Pure: no I/O, no clock. Input is one stored record as a dict (service/infra/audit/store.AuditRecord.to_json):
seq, recorded, kind, outcome, actor, patient, detail, prev_hash, hash.

Which BALP pattern each SpineWatch record follows (https://profiles.ihe.net/ITI/BALP/):

    kind           pattern                 type / subtype / action       client (who asked)    server
    notification   PatientCreate / Create  rest / create / C             the FHIR notifier     SpineWatch
    evaluation     PatientCreate / Create  rest / create / C             worker or hook caller SpineWatch
                   (the assessment is what is created; the inputs are extra entities, typed by
                   resource type, with their versionIds)
    card           PatientRead / Read      rest / read / R               the EHR (CDS client)  SpineWatch
    evidence-view  PatientRead / Read      rest / read / R               the EHR (CDS client)  SpineWatch
                   (a card's full-evidence page opened; the link is a capability, so the client named
                   is the CDS client it was issued to, and the viewer's address is in the detail)
    feedback       PatientCreate / Create  rest / create / C             the EHR               SpineWatch
    alert          PatientCreate / Create  rest / create / C             SpineWatch worker     FHIR server
                   (alert-retraction too: the follow-up Communication is written the same way)
    audit-access   PatientQuery / Query    rest / search / E             the reviewer          SpineWatch
    auth-failure   FHIR "Access Denied"    DCM 110114 / 110122 Login / E the rejected caller   SpineWatch
    other          -                       DCM 110100 Application Activity / E

BALP fixes `outcome` to 0 (success) in these profiles and says failures "are recorded differently":
a failed event keeps the same shape but claims no profile in `meta.profile`. BALP's Read/Query
profiles name the requesting client "Destination Role ID" (110152) and the server "Source Role ID"
(110153), the reverse of Create; that DICOM convention is kept as the profiles state it.

The hash chain travels along in an extension (seq, previous hash, hash) so an exported copy can be
verified on its own.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
NETWORK_TYPE = "http://hl7.org/fhir/network-type"
CHAIN_URL = "https://spinewatch.example.org/fhir/StructureDefinition/audit-chain"
DETAIL_SYSTEM = "https://spinewatch.example.org/fhir/CodeSystem/audit-detail"
ASSESSMENT_SYSTEM = "https://spinewatch.example.org/fhir/NamingSystem/assessment"
FEEDBACK_SYSTEM = "https://spinewatch.example.org/fhir/NamingSystem/card"

REST = {"system": EVENT_TYPE, "code": "rest", "display": "Restful Operation"}
CLIENT_CREATE = {"system": DCM, "code": "110153", "display": "Source Role ID"}
SERVER_CREATE = {"system": DCM, "code": "110152", "display": "Destination Role ID"}
PATIENT_ENTITY_TYPE = {"system": ENTITY_TYPE, "code": "1", "display": "Person"}
PATIENT_ROLE = {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}
SYSTEM_OBJECT = {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}
DOMAIN_RESOURCE = {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"}
REPORT = {"system": OBJECT_ROLE, "code": "3", "display": "Report"}
QUERY_ROLE = {"system": OBJECT_ROLE, "code": "24", "display": "Query"}

# kind -> (profile stem, subtype, action, SpineWatch is the server?)
_PATTERNS = {
    "notification": ("Create", {"system": RESTFUL, "code": "create", "display": "create"}, "C", True),
    "evaluation": ("Create", {"system": RESTFUL, "code": "create", "display": "create"}, "C", True),
    "card": ("Read", {"system": RESTFUL, "code": "read", "display": "read"}, "R", True),
    "evidence-view": ("Read", {"system": RESTFUL, "code": "read", "display": "read"}, "R", True),
    "feedback": ("Create", {"system": RESTFUL, "code": "create", "display": "create"}, "C", True),
    "alert": ("Create", {"system": RESTFUL, "code": "create", "display": "create"}, "C", False),
    "alert-retraction": ("Create", {"system": RESTFUL, "code": "create", "display": "create"}, "C", False),
    "audit-access": ("Query", {"system": RESTFUL, "code": "search", "display": "search"}, "E", True),
}
_SERIOUS = {"failure", "failed", "error", "dead-letter"}
_MINOR = {"denied", "rejected", "unauthorized"}
_REFERENCE = re.compile(r"^(?:https?://\S+/)?([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


@dataclass(frozen=True)
class ExportContext:
    """Who SpineWatch is on the network (BALP agent.network is 1..1 for client and server)."""
    site: str = "spinewatch"  # host name of the service
    service_url: str | None = None  # its base URL, when known
    fhir_server: str | None = None  # the EHR FHIR base URL (the server of an alert's create)


def is_reference(value) -> bool:
    return isinstance(value, str) and bool(_REFERENCE.match(value))


def _coding_outcome(kind: str, outcome: str) -> str:
    if kind == "auth-failure" or outcome in _MINOR:
        return "4"  # minor failure: the request was refused (FHIR security "Access Denied")
    return "8" if outcome in _SERIOUS else "0"


def _network(address: str) -> dict:
    if "://" in address:
        return {"address": address[:200], "type": "5"}  # URI
    return {"address": address[:200], "type": "1"}  # machine name


def _who(actor: str) -> dict:
    if actor.startswith(("http://", "https://", "urn:")):
        return {"identifier": {"system": "urn:ietf:rfc:3986", "value": actor}, "display": actor}
    return {"identifier": {"value": actor}, "display": actor}


def _spinewatch(ctx: ExportContext, role: dict) -> dict:
    return {"type": {"coding": [role]}, "requestor": False,
            "who": {"identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:spinewatch:service"},
                    "display": "SpineWatch"},
            "network": _network(ctx.service_url or ctx.site)}


def _caller(actor: str, role: dict, ctx: ExportContext) -> dict:
    # The caller's network address: its URL when the actor is one (CDS client iss, FHIR base), else
    # unknown to the log, so the service's own host is named as the observer of the connection.
    address = actor if "://" in actor else ctx.site
    return {"type": {"coding": [role]}, "requestor": True, "who": _who(actor), "network": _network(address)}


def _details(pairs: dict) -> list[dict]:
    out = []
    for key, value in pairs.items():
        if value is None or value == [] or value == {}:
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
        out.append({"type": key, "valueString": text})
    return out


def _resource_entity(reference: str) -> dict:
    kind = reference.split("/_history/")[0].split("/")[-2]
    return {"what": {"reference": reference}, "type": {"system": RESOURCE_TYPES, "code": kind, "display": kind},
            "role": DOMAIN_RESOURCE}


def _references(value) -> list[str]:
    """All FHIR references found in a detail value (lists, dicts of reference -> version)."""
    found: list[str] = []
    if isinstance(value, str):
        if is_reference(value):
            found.append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            if is_reference(k):  # {"Condition/1": "3"}: reference -> versionId
                found.append(f"{k}/_history/{v}" if isinstance(v, (str, int)) and v not in ("", None) else k)
            else:
                found.extend(_references(v))
    elif isinstance(value, (list, tuple)):
        for v in value:
            found.extend(_references(v))
    return found


def _data_entity(kind: str, record: dict) -> tuple[dict | None, list[str]]:
    """The BALP `data` entity (type 2 System Object) and the references used for it."""
    d = record.get("detail") or {}
    seq = record.get("seq")
    if kind == "evaluation":
        what = {"identifier": {"system": ASSESSMENT_SYSTEM, "value": str(d.get("assessment") or f"audit-{seq}")}}
        entity = {"what": what, "type": SYSTEM_OBJECT, "role": REPORT,
                  "detail": _details({k: d.get(k) for k in ("tier", "flags", "red_flags", "rules", "rule_versions",
                                                             "valuesets", "origin", "suppressed_by")})}
        return entity, []
    if kind == "card":
        instance = d.get("hookInstance") or d.get("hook_instance")
        what = {"identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{instance}"}} if instance \
            else {"display": "CDS Hooks response"}
        entity = {"what": what, "type": SYSTEM_OBJECT, "role": REPORT,
                  "detail": _details({"hook": d.get("hook"), "cards": d.get("cards"), "indicator": d.get("indicator"),
                                      "service": d.get("service")})}
        return entity, []
    if kind == "evidence-view":
        instance = d.get("hookInstance")
        what = {"identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{instance}"}} if instance \
            else {"display": "full evidence of a card"}
        entity = {"what": what, "type": SYSTEM_OBJECT, "role": REPORT,
                  "detail": _details({k: d.get(k) for k in ("hook", "service", "tier", "findings", "via")})}
        return entity, []
    if kind == "feedback":
        card = d.get("card") or d.get("card_uuid")
        what = {"identifier": {"system": FEEDBACK_SYSTEM, "value": str(card)}} if card else {"display": "feedback"}
        entity = {"what": what, "type": SYSTEM_OBJECT, "role": DOMAIN_RESOURCE,
                  "detail": _details({"outcome": d.get("outcome") or record.get("outcome"),
                                      "overrideReason": d.get("overrideReason")
                                      or d.get("override_reason"), "hook": d.get("hook"),
                                      "service": d.get("service")})}
        return entity, []
    if kind in ("alert", "alert-retraction"):  # a follow-up is a Communication written like the alert
        ref = d.get("communication")
        what = {"reference": ref} if is_reference(ref) else {"identifier": {"value": str(d.get("alert_id") or seq)}}
        entity = {"what": what, "type": SYSTEM_OBJECT, "role": DOMAIN_RESOURCE,
                  "detail": _details({k: d.get(k) for k in ("alert_id", "tier", "channel", "channels", "recipients",
                                                             "recipient_source", "error")})}
        return entity, [ref] if ref else []
    if kind == "notification":
        ref = d.get("subscription") or (record.get("actor") if is_reference(record.get("actor")) else None)
        what = {"reference": ref} if is_reference(ref) else {"display": "subscription notification"}
        entity = {"what": what, "type": SYSTEM_OBJECT, "role": DOMAIN_RESOURCE,
                  "detail": _details({k: d.get(k) for k in ("kind", "type", "event", "events", "topic", "status",
                                                             "outcome")})}
        return entity, [ref] if ref else []
    if kind == "audit-access":
        query = d.get("query") or json.dumps(d.get("filters") or {}, sort_keys=True)
        entity = {"what": {"display": "audit log"}, "type": SYSTEM_OBJECT, "role": QUERY_ROLE,
                  "query": base64.b64encode(str(query).encode("utf-8")).decode("ascii"),
                  "detail": _details({"count": d.get("count"), "format": d.get("format")})}
        return entity, []
    return None, []


def audit_event(record: dict, ctx: ExportContext | None = None) -> dict:
    """One stored audit record as a FHIR R4 AuditEvent (JSON dict) following the BALP pattern above."""
    ctx = ctx or ExportContext()
    kind, outcome = record["kind"], record["outcome"]
    actor, patient = record.get("actor") or "unknown", record.get("patient")
    detail = record.get("detail") or {}
    code = _coding_outcome(kind, outcome)
    pattern = _PATTERNS.get(kind)

    event: dict = {"resourceType": "AuditEvent", "id": f"spinewatch-audit-{record['seq']}"}
    if pattern:
        stem, subtype, action, spinewatch_serves = pattern
        event |= {"type": REST, "subtype": [subtype], "action": action}
        # BALP: Create names client 110153 / server 110152; Read and Query the reverse.
        client_role, server_role = ((CLIENT_CREATE, SERVER_CREATE) if stem == "Create"
                                    else (SERVER_CREATE, CLIENT_CREATE))
        if spinewatch_serves:
            agents = [_caller(actor, client_role, ctx), _spinewatch(ctx, server_role)]
        else:  # SpineWatch is the client (it writes a Communication to the EHR's FHIR server)
            server = ctx.fhir_server or detail.get("fhir_server") or "fhir-server"
            me = _spinewatch(ctx, client_role) | {"requestor": True}
            me["who"] = _who(actor) if actor else me["who"]
            agents = [me, {"type": {"coding": [server_role]}, "requestor": False, "who": _who(server),
                           "network": _network(server)}]
        profile = BALP + ("Patient" + stem if patient else stem) if code == "0" else None
    elif kind == "auth-failure":
        event |= {"type": {"system": DCM, "code": "110114", "display": "User Authentication"},
                  "subtype": [{"system": DCM, "code": "110122", "display": "Login"}], "action": "E"}
        agents = [_caller(actor, CLIENT_CREATE, ctx), _spinewatch(ctx, SERVER_CREATE)]
        profile = None
    else:
        event |= {"type": {"system": DCM, "code": "110100", "display": "Application Activity"}, "action": "E"}
        agents = [_spinewatch(ctx, SERVER_CREATE) | {"requestor": True, "who": _who(actor)}]
        profile = None
    if profile:
        event["meta"] = {"profile": [profile]}
    event["recorded"] = record["recorded"]
    event["outcome"] = code
    if code != "0":
        reason = detail.get("error") or detail.get("reason") or outcome
        event["outcomeDesc"] = str(reason)[:200]
    event["agent"] = agents
    event["source"] = {"site": ctx.site,
                       "observer": {"identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:spinewatch:service"},
                                    "display": "SpineWatch"},
                       "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}]}

    entities: list[dict] = []
    if patient:
        entities.append({"what": {"reference": patient}, "type": PATIENT_ENTITY_TYPE, "role": PATIENT_ROLE})
    data, used = _data_entity(kind, record)
    if data is not None:
        entities.append(_drop_empty(data))
    elif kind == "auth-failure":
        entities.append({"what": {"display": str(detail.get("surface") or "service")}, "type": SYSTEM_OBJECT,
                         "role": DOMAIN_RESOURCE, "detail": _details({"reason": detail.get("reason"),
                                                                      "surface": detail.get("surface")})})
        entities[-1] = _drop_empty(entities[-1])
    # Every other FHIR reference in the detail (evaluation inputs with versions, evidence, focus):
    # typed by resource type, so they fall outside BALP's single `data` slice (open slicing).
    seen = set(used) | {patient}
    for ref in _references(detail):
        if ref not in seen and not ref.startswith("Patient/"):
            seen.add(ref)
            entities.append(_resource_entity(ref))
    if entities:
        event["entity"] = entities
    event["extension"] = [{"url": CHAIN_URL, "extension": [
        {"url": "seq", "valueInteger": int(record["seq"])},
        {"url": "previousHash", "valueString": record["prev_hash"]},
        {"url": "hash", "valueString": record["hash"]},
    ]}]
    head = {k: event.pop(k) for k in ("resourceType", "id", "meta") if k in event}
    return head | event


def _drop_empty(entity: dict) -> dict:
    return {k: v for k, v in entity.items() if v not in (None, [], {})}


def bundle(events: list[dict]) -> dict:
    """A collection Bundle of AuditEvents (for `spinewatch audit export --format fhir --bundle`)."""
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, e['id'])}", "resource": e}
                      for e in events]}
