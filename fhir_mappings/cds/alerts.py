"""Care-team alerts as FHIR R4 Communication resources, and the webhook body. Pure: no I/O, no clock.

Which assessments alert (NG234 Boxes 1 and 2; QS56 statement 3): `emergency` at once (priority `stat`) and `urgent`
(priority `urgent`); `routine` and `none` never do. The same patient with the same tier and the same
evidence alerts once (de-duplication): `alert_id` is a digest of
exactly those three, so it is the de-duplication key, the Communication.identifier (conditional
create, FHIR R4 §3.1.0.8.1 `If-None-Exist`) and the webhook delivery id. An upgrade from urgent to
emergency changes the tier, hence the id, hence alerts again.

Recipients (FHIR R4 Communication.recipient) are resolved in a fixed order: the members of the
patient's active CareTeam(s), else Patient.generalPractitioner, else the configured default.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime

from fhir_mappings.cds.wording import PRIORITY, SUMMARY

ALERT_TIERS = ("emergency", "urgent")
ALERT_ID_SYSTEM = "https://spinewatch.example.org/fhir/NamingSystem/alert-id"
SENDER = {"identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:spinewatch:service"}, "display": "SpineWatch"}
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/communication-category"
SIGNATURE_HEADER = "X-SpineWatch-Signature"
DELIVERY_HEADER = "X-SpineWatch-Delivery"
# Communication.recipient (R4): the reference types it allows.
_RECIPIENT_TYPES = {"Device", "Organization", "Patient", "Practitioner", "PractitionerRole", "RelatedPerson",
                    "Group", "CareTeam", "HealthcareService"}
# Communication.reasonReference (R4): Condition | Observation | DiagnosticReport | DocumentReference.
_REASON_TYPES = {"Condition", "Observation", "DiagnosticReport", "DocumentReference"}


@dataclass(frozen=True)
class AlertInput:
    """What an alert needs from an assessment (an `Assessment` or its `to_json()`)."""
    patient: str
    tier: str
    red_flags: tuple[str, ...]
    evidence: tuple[str, ...]  # references of the red-flag evidence, in assessment order
    cancers: tuple[str, ...]
    fingerprint: tuple[str, ...]  # Assessment.evidence_fingerprint()


def alert_input(assessment) -> AlertInput | None:
    """The alert facts of an assessment, or None when it does not alert (tier, no patient)."""
    if isinstance(assessment, dict):
        data = assessment
        tier, patient = data.get("urgency"), data.get("patient")
        evidence = data.get("evidence") or []
        back_pain = data.get("back_pain") or []
        fingerprint = sorted({f"{e['concept']}:{e['reference']}@{e.get('versionId') or ''}"
                              for e in evidence + back_pain})
        refs = [e["reference"] for e in evidence]
        cancers = [e["reference"] for e in data.get("cancers") or []]
        flags = data.get("red_flags") or []
    else:
        tier, patient = assessment.urgency, assessment.patient
        fingerprint = assessment.evidence_fingerprint()
        refs = [e.reference for e in assessment.evidence]
        cancers = [e.reference for e in assessment.cancers]
        flags = assessment.red_flags
    if tier not in ALERT_TIERS or not patient:
        return None
    return AlertInput(patient, tier, tuple(flags), tuple(dict.fromkeys(refs)), tuple(dict.fromkeys(cancers)),
                      tuple(fingerprint))


def alert_id(alert: AlertInput) -> str:
    """Stable id for (patient, tier, evidence): equal inputs, equal id; anything new, a new id."""
    material = json.dumps([alert.patient, alert.tier, list(alert.fingerprint)], separators=(",", ":"))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:40]


def if_none_exist(identifier_value: str) -> str:
    """The If-None-Exist header value for a conditional create on the alert identifier."""
    return f"identifier={ALERT_ID_SYSTEM}|{identifier_value}"


# -- recipients ------------------------------------------------------------------------------------

def _period_covers(period: dict | None, now: datetime) -> bool:
    if not period:
        return True
    for bound, ok in (("start", lambda t: t <= now), ("end", lambda t: t >= now)):
        value = period.get(bound)
        if value:
            try:
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=now.tzinfo)
            if not ok(moment):
                return False
    return True


def _recipient_ref(reference: dict | None) -> str | None:
    ref = (reference or {}).get("reference")
    if not ref or "/" not in ref:
        return None
    kind = ref.split("/_history/")[0].split("/")[-2]  # relative or absolute reference
    return ref if kind in _RECIPIENT_TYPES else None


def _same_reference(a: str | None, b: str) -> bool:
    if not a:
        return False
    return a == b or a.split("/_history/")[0].endswith("/" + b)


def care_team_members(care_teams: list[dict], now: datetime, patient: str | None = None) -> list[str]:
    """Members of active CareTeams (of `patient`, when given) whose participation covers now.

    The subject is checked here even though the search asked for it: FHIR R4 §3.1.1.4 lets a
    server ignore a search parameter it does not support (sekmet ignores CareTeam?patient=), and
    another patient's team must never be alerted."""
    out: list[str] = []
    for team in care_teams:
        if team.get("resourceType") != "CareTeam" or team.get("status") != "active":
            continue
        if patient and not _same_reference((team.get("subject") or {}).get("reference"), patient):
            continue
        if not _period_covers(team.get("period"), now):
            continue
        for participant in team.get("participant") or []:
            if not _period_covers(participant.get("period"), now):
                continue
            ref = _recipient_ref(participant.get("member"))
            if ref and ref not in out:
                out.append(ref)
    return out


def general_practitioners(patient: dict | None) -> list[str]:
    refs = [_recipient_ref(gp) for gp in (patient or {}).get("generalPractitioner") or []]
    return list(dict.fromkeys(r for r in refs if r))


def resolve_recipients(care_teams: list[dict], patient: dict | None, default: str | None,
                       now: datetime, patient_ref: str | None = None) -> tuple[list[str], str]:
    """(recipients, source) in the stated order; source: care-team | general-practitioner | default | none."""
    members = care_team_members(care_teams, now, patient_ref)
    if members:
        return members, "care-team"
    gps = general_practitioners(patient)
    if gps:
        return gps, "general-practitioner"
    if default:
        return [default], "default"
    return [], "none"


# -- the Communication -----------------------------------------------------------------------------

def communication(alert: AlertInput, recipients: list[str], sent: datetime) -> dict:
    """FHIR R4 Communication (category alert) for one alert. The payload holds the summary and
    references only: quoted patient text stays in the chart it came from."""
    ident = alert_id(alert)
    reasons = [r for r in dict.fromkeys(alert.evidence + alert.cancers) if r.split("/")[0] in _REASON_TYPES]
    flags = ", ".join(alert.red_flags) or "none"
    payload = [{"contentString": f"{SUMMARY[alert.tier]}. Red flags: {flags}."}]
    payload += [{"contentReference": {"reference": ref}} for ref in alert.evidence]
    resource = {
        "resourceType": "Communication",
        "identifier": [{"system": ALERT_ID_SYSTEM, "value": ident}],
        "status": "completed",
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "alert", "display": "Alert"}]}],
        "priority": PRIORITY[alert.tier],
        "subject": {"reference": alert.patient},
        "sent": sent.isoformat(),
        "recipient": [{"reference": r} for r in recipients],
        "sender": SENDER,
        "payload": payload,
    }
    if reasons:
        resource["reasonReference"] = [{"reference": r} for r in reasons]
    return resource


# -- the webhook -----------------------------------------------------------------------------------

def webhook_body(alert: AlertInput, communication_ref: str | None, recipients: list[str], sent: datetime) -> bytes:
    """The JSON the webhook receives: ids, tier, codes and references; no free text about the patient."""
    body = {
        "id": alert_id(alert),
        "type": "spinewatch.alert",
        "tier": alert.tier,
        "priority": PRIORITY[alert.tier],
        "summary": SUMMARY[alert.tier],
        "patient": alert.patient,
        "red_flags": list(alert.red_flags),
        "evidence": list(alert.evidence),
        "recipients": recipients,
        "communication": communication_ref,
        "sent": sent.isoformat(),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")


def sign(body: bytes, secret: str) -> str:
    """X-SpineWatch-Signature value: "sha256=" + hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, secret: str, header: str | None) -> bool:
    """For receivers (and tests): constant-time check of a signature header against the body."""
    if not header:
        return False
    return hmac.compare_digest(sign(body, secret), header.strip())
