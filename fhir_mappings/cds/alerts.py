"""Care-team alerts as FHIR R4 Communication resources, and the webhook body. Pure: no I/O, no clock.

Which assessments alert (NG234 Boxes 1 and 2; QS56 statement 3): `emergency` at once (priority `stat`) and `urgent`
(priority `urgent`); `routine` and `none` never do. The same patient with the same tier and the same
evidence alerts once (de-duplication): `alert_id` is a digest of
exactly those three, so it is the de-duplication key, the Communication.identifier (conditional
create, FHIR R4 §3.1.0.8.1 `If-None-Exist`) and the webhook delivery id. An upgrade from urgent to
emergency changes the tier, hence the id, hence alerts again.

Recipients (FHIR R4 Communication.recipient) are resolved in a fixed order: the members of the
patient's active CareTeam(s), else Patient.generalPractitioner, else the configured default.

Retractions: a record an alert rested on may since have been deleted on the server, marked
entered-in-error, or moved to another patient's record. The care team then gets one follow-up
Communication (`inResponseTo` the alert Communications concerned) saying which records, what the
assessment is now, and that clinical judgement stands. `retraction_for` decides which sent alerts
are affected, and `retraction_id` makes the follow-up idempotent like the alert itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from fhir_mappings.cds.wording import PRIORITY, SUMMARY
from fhir_mappings.fhir.bundle import patient_key

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
    basis: tuple[str, ...] = ()  # every reference the alert rests on: red-flag evidence, back pain, cancers


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
        pain = [e["reference"] for e in back_pain]
        flags = data.get("red_flags") or []
    else:
        tier, patient = assessment.urgency, assessment.patient
        fingerprint = assessment.evidence_fingerprint()
        refs = [e.reference for e in assessment.evidence]
        cancers = [e.reference for e in assessment.cancers]
        pain = [e.reference for e in assessment.back_pain]
        flags = assessment.red_flags
    if tier not in ALERT_TIERS or not patient:
        return None
    basis = sorted({r for r in refs + pain + cancers if "/" in r})
    return AlertInput(patient, tier, tuple(flags), tuple(dict.fromkeys(refs)), tuple(dict.fromkeys(cancers)),
                      tuple(fingerprint), tuple(basis))


def alert_id(alert: AlertInput) -> str:
    """Stable id for (patient, tier, evidence): equal inputs, equal id; anything new, a new id."""
    material = json.dumps([alert.patient, alert.tier, list(alert.fingerprint)], separators=(",", ":"))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:40]


def if_none_exist(identifier_value: str, system: str = ALERT_ID_SYSTEM) -> str:
    """The If-None-Exist header value for a conditional create on the alert (or follow-up) identifier."""
    return f"identifier={system}|{identifier_value}"


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
    resource = communication_base(ALERT_ID_SYSTEM, ident, PRIORITY[alert.tier], alert.patient, recipients, sent, payload)
    if reasons:
        resource["reasonReference"] = [{"reference": r} for r in reasons]
    return resource


def communication_base(system: str, ident: str, priority: str, patient: str, recipients: list[str], sent: datetime,
                       payload: list[dict]) -> dict:
    """The Communication (category alert) every SpineWatch message to the care team shares."""
    return {
        "resourceType": "Communication",
        "identifier": [{"system": system, "value": ident}],
        "status": "completed",
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "alert", "display": "Alert"}]}],
        "priority": priority,
        "subject": {"reference": patient},
        "sent": sent.isoformat(),
        "recipient": [{"reference": r} for r in recipients],
        "sender": SENDER,
        "payload": payload,
    }


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


# -- retractions -----------------------------------------------------------------------------------

RETRACTION_ID_SYSTEM = "https://spinewatch.example.org/fhir/NamingSystem/alert-retraction-id"
RETRACTION_TYPE = "spinewatch.alert.retraction"
DELETED = "deleted on the server"
ENTERED_IN_ERROR = "entered-in-error"
MOVED = "moved to another patient's record"
_REASON_WORDING = {DELETED: "deleted on the server", ENTERED_IN_ERROR: "marked entered-in-error", MOVED: MOVED}
_TIER_RANK = {"none": 0, "routine": 1, "urgent": 2, "emergency": 3}
_NO_TIER = "none: the record as it stands does not meet SpineWatch's criteria for suspected spinal metastasis"
JUDGEMENT_STANDS = ("Clinical judgement stands: SpineWatch does not cancel an MRI already requested or change any "
                    "order.")


def entered_in_error(resource: dict) -> bool:
    """FHIR R4 marks a record made in error: Condition.verificationStatus `entered-in-error`;
    `status` `entered-in-error` on Observation, DiagnosticReport, DocumentReference, Procedure,
    ServiceRequest, ImagingStudy and ClinicalImpression; DocumentReference.docStatus too."""
    if ENTERED_IN_ERROR in (resource.get("status"), resource.get("docStatus")):
        return True
    verification = resource.get("verificationStatus")
    codings = verification.get("coding") if isinstance(verification, dict) else None
    return any(isinstance(c, dict) and c.get("code") == ENTERED_IN_ERROR for c in codings or [])


def retraction_reason(current: dict | None, patient: str) -> str | None:
    """Why a record a decision rested on no longer supports it: gone from the server (None: a read
    answered 404/410), marked entered-in-error, or now about another patient. None: it stands (it
    may just have aged out of the lookback, which is no retraction)."""
    if current is None:
        return DELETED
    if entered_in_error(current):
        return ENTERED_IN_ERROR
    owner = patient_key(current)
    return MOVED if owner is not None and owner != patient else None


@dataclass(frozen=True)
class SentAlert:
    """An alert already sent, as the alerts' Redis record keeps it (workers/alerts.py)."""
    alert_id: str
    tier: str
    sent: str  # ISO 8601
    communication: str  # Communication/<id>
    recipients: tuple[str, ...]
    basis: tuple[str, ...]  # AlertInput.basis
    fingerprint: tuple[str, ...]
    retracted: tuple[str, ...] = ()  # references a follow-up has already reported


@dataclass(frozen=True)
class CurrentAssessment:
    """What the follow-up says the assessment is now."""
    tier: str
    red_flags: tuple[str, ...]
    evidence: tuple[str, ...]


@dataclass(frozen=True)
class AffectedAlert:
    alert: SentAlert
    retracted: tuple[str, ...]  # the references of its basis retracted since, not reported before


@dataclass(frozen=True)
class Retraction:
    """One follow-up to the care team: the sent alerts whose records were retracted, and why."""
    patient: str
    affected: tuple[AffectedAlert, ...]
    reasons: tuple[tuple[str, str], ...]  # (reference, reason), sorted
    current: CurrentAssessment

    @property
    def references(self) -> tuple[str, ...]:
        return tuple(sorted({ref for a in self.affected for ref in a.retracted}))


def current_assessment(assessment) -> CurrentAssessment:
    """The tier, flags and red-flag evidence of an `Assessment` (or its `to_json()`)."""
    if isinstance(assessment, dict):
        refs = [e["reference"] for e in assessment.get("evidence") or []]
        return CurrentAssessment(assessment.get("urgency") or "none", tuple(assessment.get("red_flags") or []),
                                 tuple(dict.fromkeys(refs)))
    refs = [e.reference for e in assessment.evidence]
    return CurrentAssessment(assessment.urgency, tuple(assessment.red_flags), tuple(dict.fromkeys(refs)))


def unreported_basis(sent: list[SentAlert], cited_now: set[str]) -> set[str]:
    """References sent alerts rested on that the current assessment no longer cites and that no
    follow-up reported yet: the ones whose state is worth checking on the server."""
    return {ref for a in sent for ref in a.basis if ref not in cited_now and ref not in a.retracted}


def retraction_for(patient: str, sent: list[SentAlert], reasons: dict[str, str],
                   current: CurrentAssessment) -> Retraction | None:
    """The follow-up owed, or None: every sent alert whose basis holds a retracted reference it has
    not reported yet, oldest alert first."""
    affected = []
    for alert in sorted(sent, key=lambda a: (a.sent, a.alert_id)):
        lost = tuple(sorted(r for r in alert.basis if r in reasons and r not in alert.retracted))
        if lost:
            affected.append(AffectedAlert(alert, lost))
    if not affected:
        return None
    used = {ref for a in affected for ref in a.retracted}
    return Retraction(patient, tuple(affected), tuple(sorted((r, reasons[r]) for r in used)), current)


def retraction_id(retraction: Retraction) -> str:
    """Stable id for (patient, each affected alert with its newly retracted references): the same
    retraction, the same id, however often it is found; the follow-up's identifier and delivery id."""
    material = json.dumps([retraction.patient, [[a.alert.alert_id, list(a.retracted)] for a in retraction.affected]],
                          separators=(",", ":"))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:40]


def follow_up_recipients(retraction: Retraction) -> list[str]:
    """Everyone the affected alerts went to, in the order they were told."""
    return list(dict.fromkeys(r for a in retraction.affected for r in a.alert.recipients))


def stands_in_for(retraction: Retraction, alert: AlertInput | None) -> bool:
    """Whether the follow-up already says all that the current assessment's alert would: it rests
    only on evidence an affected alert stated, at no higher tier. The follow-up names the current
    tier and flags, so a second alert repeating the earlier one would only add noise."""
    if alert is None:
        return False
    evidence = set(alert.fingerprint)
    return any(evidence <= set(a.alert.fingerprint) and _TIER_RANK[alert.tier] <= _TIER_RANK[a.alert.tier]
               for a in retraction.affected)


def _when(instant: str) -> str:
    try:
        moment = datetime.fromisoformat(instant.replace("Z", "+00:00"))
    except ValueError:
        return instant
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%d %H:%M")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def retraction_text(retraction: Retraction) -> str:
    """The follow-up's words: which alerts, which records (references only: no quoted text), what
    the assessment is now, and that clinical judgement stands."""
    alerts = retraction.affected
    earlier = " and ".join(f"{_when(a.alert.sent)} ({a.alert.tier})" for a in alerts)
    by_reason: dict[str, list[str]] = {}
    for ref, reason in retraction.reasons:
        by_reason.setdefault(reason, []).append(ref)
    records = " and ".join(f"since {_REASON_WORDING.get(reason, reason)} ({', '.join(refs)})"
                           for reason, refs in by_reason.items())
    now = retraction.current
    state = f"{now.tier}: {SUMMARY[now.tier]}" if now.tier in SUMMARY else _NO_TIER
    flags = ", ".join(now.red_flags) or "none"
    subject = ("the SpineWatch alert of " if len(alerts) == 1 else "the SpineWatch alerts of ") + earlier
    based_on = "a record" if len(retraction.reasons) == 1 else "records"
    return (f"Update to {subject}: {'it was' if len(alerts) == 1 else 'they were'} based on {based_on} {records}. "
            f"Current assessment: {state}. Red flags now: {flags}. {JUDGEMENT_STANDS}")


def retraction_communication(retraction: Retraction, recipients: list[str], sent: datetime) -> dict:
    """FHIR R4 Communication (category alert) following up the affected alerts: `inResponseTo`
    their Communications, priority by the current tier (routine when it no longer alerts). The
    payload names the retracted records by reference only (they may no longer resolve) and points
    at the current red-flag evidence."""
    priority = PRIORITY.get(retraction.current.tier, PRIORITY["routine"])
    payload = [{"contentString": retraction_text(retraction)}]
    payload += [{"contentReference": {"reference": ref}} for ref in retraction.current.evidence]
    resource = communication_base(RETRACTION_ID_SYSTEM, retraction_id(retraction), priority, retraction.patient, recipients,
                        sent, payload)
    resource["inResponseTo"] = [{"reference": a.alert.communication} for a in retraction.affected]
    return resource


def retraction_webhook_body(retraction: Retraction, communication_ref: str | None, recipients: list[str],
                            sent: datetime) -> bytes:
    """The webhook's follow-up: ids, tiers, flags and references; no free text about the patient."""
    now = retraction.current
    body = {
        "id": retraction_id(retraction),
        "type": RETRACTION_TYPE,
        "patient": retraction.patient,
        "priority": PRIORITY.get(now.tier, PRIORITY["routine"]),
        "tier": now.tier,
        "red_flags": list(now.red_flags),
        "evidence": list(now.evidence),
        "retracted": [{"reference": ref, "reason": reason} for ref, reason in retraction.reasons],
        "alerts": [{"id": a.alert.alert_id, "tier": a.alert.tier, "sent": a.alert.sent,
                    "communication": a.alert.communication, "retracted": list(a.retracted)}
                   for a in retraction.affected],
        "recipients": recipients,
        "communication": communication_ref,
        "sent": sent.isoformat(),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")
