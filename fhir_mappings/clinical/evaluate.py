"""The clinical decision: assess(resources, now, settings) → Assessment.

Pure: no I/O, no clock. The worker and the CDS Hooks service both call it. NICE NG234 (2023) is the
source of every rule here (each rule file cites its section); the codes and phrases are data (valuesets/, rules/).

Over 300 lines on purpose: the whole decision (what counts as evidence, in scope, recent, the tier
and what is already ordered) reads top to bottom in one file for a clinical reviewer; the reading
of records and texts it builds on lives in extract.py, sieve.py, text.py and context.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from fhir_mappings.clinical.extract import read_record
from fhir_mappings.clinical.facts import NOTE_MAX_CHARS, Clinical, Evidence, Record, concept_evidence
from fhir_mappings.clinical.terminology import Rule, Terminology, load_terminology
from fhir_mappings.clinical.text import Mention

TIERS = ("emergency", "urgent", "routine", "none")

# NG234 1.1 (any current or past cancer): a cancer Condition with these verification statuses is no cancer.
# "unconfirmed" is the parent of provisional and differential in the R4 condition-ver-status codes.
_CANCER_DOES_NOT_COUNT = {"refuted", "entered-in-error", "provisional", "differential", "unconfirmed"}
# NG234 1.1 (recent spinal pain): evidence with these statuses never counts.
_VERIFICATION_NEVER_COUNTS = {"refuted", "entered-in-error"}
_OBSERVATION_NEVER_COUNTS = {"entered-in-error", "cancelled"}
_CONDITION_INACTIVE = {"resolved", "inactive", "remission"}
_CONDITION_ACTIVE = {"active", "recurrence", "relapse"}
# Suppression and pending orders: a spine MRI done answers the question (NG234 1.4).
_REPORT_DONE = {"final", "amended", "corrected", "appended"}
_ORDER_PENDING = {"active", "on-hold"}
# A spine X-ray ordered (not yet done) or done within the lookback: the card then says why not X-ray.
_XRAY_ORDER_OPEN = {"draft", "active", "on-hold"}
_XRAY_DONE = {"available", "final", "amended", "corrected", "appended", "completed", "preliminary"}
_MR_MODALITY = "MR"
_NOTE_TYPES = frozenset({"DocumentReference", "DiagnosticReport", "ClinicalImpression"})
_REPORT_BODY = frozenset({"DiagnosticReport.conclusion", "DiagnosticReport.presentedForm"})
_SPINAL_PAIN_FLAG = "thoracic-or-cervical-pain"  # a Box 1 flag that is itself back pain


@dataclass(frozen=True)
class EvaluationSettings:
    lookback_days: int = 90  # NG234 1.1 (recent spinal pain): default 90 days; a deployment setting
    note_max_chars: int = NOTE_MAX_CHARS  # a longer note is named in `problems`, its start still read

    def __post_init__(self):
        if self.lookback_days < 1:
            raise ValueError("lookback_days must be at least 1")
        if self.note_max_chars < 1000:
            raise ValueError("note_max_chars must be at least 1000")


@dataclass
class PendingOrder:
    reference: str
    status: str
    due: datetime | None

    def to_json(self) -> dict:
        out = {"reference": self.reference, "status": self.status}
        return out | ({"due": self.due.isoformat()} if self.due else {})


@dataclass
class SpineXray:
    """A plain spine X-ray in the record: ordered (`ordered`) or done within the lookback (`done`)."""
    reference: str
    state: str  # "ordered" or "done"
    date: datetime | None

    def to_json(self) -> dict:
        out = {"reference": self.reference, "state": self.state}
        return out | ({"date": self.date.isoformat()} if self.date else {})


@dataclass
class Assessment:
    patient: str | None
    evaluated_at: datetime
    urgency: str
    in_scope: bool
    cancers: list[Evidence]
    back_pain: list[Evidence]
    red_flags: list[str]  # flag ids, emergency (Box 2) first, in rule-file order
    evidence: list[Evidence]  # the evidence for each red flag
    suppressed_by: list[str]
    pending_mri: list[PendingOrder]
    problems: list[str]  # resources that could not be read, by type/id and field
    rule_versions: dict[str, str]
    seen: dict[str, str | None] = field(default_factory=dict)  # reference -> versionId read
    spine_xrays: list[SpineXray] = field(default_factory=list)  # ordered, or done within the lookback

    @property
    def box(self) -> int | None:
        return {"emergency": 2, "urgent": 1}.get(self.urgency)

    def evidence_fingerprint(self) -> list[str]:
        """What the decision rests on, stable across re-evaluations: for alert de-duplication."""
        return sorted({f"{e.concept}:{e.reference}@{e.version_id or ''}" for e in self.evidence + self.back_pain})

    def to_json(self) -> dict:
        return {
            "patient": self.patient,
            "evaluated_at": self.evaluated_at.isoformat(),
            "urgency": self.urgency,
            "in_scope": self.in_scope,
            "red_flags": self.red_flags,
            "evidence": [e.to_json() for e in self.evidence],
            "cancers": [e.to_json() for e in self.cancers],
            "back_pain": [e.to_json() for e in self.back_pain],
            "suppressed_by": self.suppressed_by,
            "pending_mri": [p.to_json() for p in self.pending_mri],
            "problems": self.problems,
            "rule_versions": self.rule_versions,
            "spine_xrays": [x.to_json() for x in self.spine_xrays],
        }


def _counts_as_evidence(item: Clinical) -> bool:
    if item.resource_type == "Condition":
        return item.verification_status not in _VERIFICATION_NEVER_COUNTS
    if item.resource_type in ("Observation", "DiagnosticReport", "ClinicalImpression"):
        return item.status not in _OBSERVATION_NEVER_COUNTS
    return item.resource_type == "DocumentReference"  # entered-in-error and replaced notes are not read


def _closed_before(item: Clinical, window_start: datetime) -> bool:
    """A Condition resolved, inactive or in remission, with its abatement before the window."""
    return (item.resource_type == "Condition" and item.clinical_status in _CONDITION_INACTIVE
            and item.abatement is not None and item.abatement < window_start)


def _is_recent(item: Clinical, window_start: datetime) -> bool:
    """NG234 1.1 (recent spinal pain): own latest clinical date within the lookback; a Condition not closed
    before the window; an undated Condition counts only while active."""
    if _closed_before(item, window_start):
        return False
    if item.resource_type == "Condition":
        if item.date is None:
            return item.clinical_status in _CONDITION_ACTIVE
    return item.date is not None and item.date >= window_start


# One text read once for every concept (text.py): field -> concept id -> the mention that raised it.
TextFindings = list[tuple[str, dict[str, Mention]]]


def _read_texts(term: Terminology, item: Clinical, pain_context: str | None) -> TextFindings:
    return [(field_name, term.matcher.findings(text, pain_context=pain_context)) for text, field_name in item.texts]


def _flag_evidence(item: Clinical, rule: Rule, texts: TextFindings) -> Evidence | None:
    for system, code, display, field_name in item.codings:
        if rule.codes.contains(system, code):
            return item.evidence(rule.id, field_name, code=f"{system}|{code}", display=display)
    for field_name, found in texts:
        mention = found.get(rule.id)
        if mention:
            status = None if mention.status == "present" else mention.status
            return item.evidence(rule.id, field_name, quote=mention.quote, status=status)
    return None


def _is_spinal_site(term: Terminology, codings, texts) -> bool:
    if any(term.spinal_site.match_coding(s, c) for s, c in codings):
        return True
    return any(term.spinal_site.match_text(t) for t in texts)


def _is_spinal_pain_condition(term: Terminology, item: Clinical) -> bool:
    """A pain Condition whose bodySite is spinal (NG234 1.1 Box 1 (spinal pain): back pain)."""
    if item.resource_type != "Condition" or not (item.body_site_codings or item.body_site_texts):
        return False
    names_pain = any(term.matcher.pain_word.search(text) for text, field_name in item.texts if field_name == "Condition.code")
    return names_pain and _is_spinal_site(term, item.body_site_codings, item.body_site_texts)


def _pain_site_flag(rule: Rule, item: Clinical, reading: str) -> Evidence | None:
    """A flag raised by where a spinal pain reading is (e.g. thoracic spine for Box 1)."""
    if reading == "severity":
        codings, texts, field_name = item.body_site_codings, item.body_site_texts, "Observation.bodySite"
    else:
        codings, texts, field_name = item.value_codings, item.value_texts, "Observation.value"
    for system, code in codings:
        if rule.pain_site_codes.contains(system, code):
            return item.evidence(rule.id, field_name, code=f"{system}|{code}")
    for text in texts:
        match = rule.pain_site_phrases.search(text) if rule.pain_site_phrases else None
        if match:
            return item.evidence(rule.id, field_name, quote=text[:200])
    return None


def _pain_reading(term: Terminology, item: Clinical) -> str | None:
    """'severity' for a spinal pain score, 'location' for a spinal pain location, else None."""
    if item.resource_type != "Observation":
        return None
    keys = {f"{s}|{c}" for s, c, _, _ in item.codings}
    if keys & term.pain_severity_codes and item.numeric_value is not None:
        if _is_spinal_site(term, item.body_site_codings, item.body_site_texts):
            return "severity"
    if keys & term.pain_location_codes and _is_spinal_site(term, item.value_codings, item.value_texts):
        return "location"
    return None


def _score_flag(rule: Rule, scores: list[Evidence]) -> list[Evidence]:
    """Evidence for a score-based flag (NG234 Box 1 'progressive' and 'severe unremitting')."""
    spec = rule.score
    if not spec or not scores:
        return []
    readings = sorted((s for s in scores if s.date is not None), key=lambda s: s.date)
    if spec.kind == "rising":
        if len(readings) >= spec.min_readings and readings[-1].value - readings[0].value >= spec.min_rise:
            return [_as_flag(r, rule.id) for r in readings]
    elif spec.kind == "sustained-severe":
        severe = [r for r in readings if r.value >= spec.threshold]
        if len(severe) >= spec.min_count and severe[-1].date - severe[0].date >= timedelta(days=spec.min_days_apart):
            return [_as_flag(r, rule.id) for r in severe]
    return []


def _as_flag(e: Evidence, flag: str) -> Evidence:
    return Evidence(flag, e.resource_type, e.resource_id, e.version_id, e.date, e.field, e.code, e.display, e.quote, e.value,
                    e.status)


def _named(item: Clinical) -> Clinical:
    """The item as its code and title name it, without a report's body: which imaging a report is
    its code says, and reading every report's full text to find out doubled an evaluation's time."""
    if not any(field_name in _REPORT_BODY for _, field_name in item.texts):
        return item
    return replace(item, texts=[(t, f) for t, f in item.texts if f not in _REPORT_BODY])


def is_spine_mri(term: Terminology, item: Clinical) -> bool:
    item = _named(item)
    if concept_evidence(item, term.mri_spine):
        return True
    if item.resource_type == "ImagingStudy" and _MR_MODALITY in item.modalities:
        return _is_spinal_site(term, item.body_site_codings, item.body_site_texts + [t for t, _ in item.texts])
    return False


def completed_mri(item: Clinical) -> bool:
    return (
        (item.resource_type == "ImagingStudy" and item.status == "available")
        or (item.resource_type == "DiagnosticReport" and item.status in _REPORT_DONE)
        or (item.resource_type == "Procedure" and item.status == "completed")
    )


def _spine_xray(term: Terminology, item: Clinical, window_start: datetime) -> SpineXray | None:
    """A plain spine X-ray ordered and not done, or done within the lookback (value set xray-spine)."""
    if not concept_evidence(_named(item), term.xray_spine):
        return None
    reference = f"{item.resource_type}/{item.resource_id}"
    if item.resource_type == "ServiceRequest":
        return SpineXray(reference, "ordered", item.date) if item.status in _XRAY_ORDER_OPEN else None
    if item.status in _XRAY_DONE and item.date is not None and item.date >= window_start:
        return SpineXray(reference, "done", item.date)
    return None


def assess(resources: list[dict], now: datetime, settings: EvaluationSettings | None = None,
           terminology: Terminology | None = None) -> Assessment:
    """Evaluate one patient's resources at time `now` (an aware datetime: never read from a clock)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    term = terminology or load_terminology()
    settings = settings or EvaluationSettings()
    return assess_record(read_record(resources, term, settings.note_max_chars), now, settings, term)


def assess_record(record: Record, now: datetime, settings: EvaluationSettings, term: Terminology) -> Assessment:
    window_start = now - timedelta(days=settings.lookback_days)
    cancers: list[Evidence] = []
    back_pain: list[Evidence] = []
    flags: dict[str, list[Evidence]] = {}
    scores: list[Evidence] = []
    imaging: list[Clinical] = []

    # Pass 1: cancers, back pain and pain readings; what each evidence item is about.
    evidence_items: list[tuple[Clinical, bool, str | None, bool]] = []  # item, recent, pain reading, spinal pain?
    for item in record.items:
        if item.date is not None and item.date > now:
            continue  # evidence dated after the evaluation time never counts (not yet written)
        if item.resource_type in ("DiagnosticReport", "ImagingStudy", "Procedure", "ServiceRequest"):
            imaging.append(item)
            if item.resource_type != "DiagnosticReport":
                continue  # a report's conclusion is read as evidence too ("cord compression at T10")
        if item.resource_type == "Condition" and item.verification_status not in _CANCER_DOES_NOT_COUNT:
            cancer = concept_evidence(item, term.cancer)
            if cancer:  # any clinical status, any date: "current or past" (NG234 1.1)
                cancers.append(cancer)
        if not _counts_as_evidence(item):
            continue
        recent = _is_recent(item, window_start)
        pain = _pain_reading(term, item) if recent else None
        spinal_pain_condition = _is_spinal_pain_condition(term, item)
        coded_pain = any(term.back_pain.match_coding(s, c) for s, c, _, _ in item.codings)
        if pain == "severity":
            reading = item.evidence("pain-score", "Observation.valueQuantity", value=item.numeric_value)
            scores.append(reading)
            back_pain.append(reading)
        elif pain == "location":
            back_pain.append(item.evidence("back-pain", "Observation.value"))
        elif recent and spinal_pain_condition:
            back_pain.append(item.evidence("back-pain", "Condition.bodySite"))
        elif recent:
            found = concept_evidence(item, term.back_pain)
            if found:
                back_pain.append(found)
        evidence_items.append((item, recent, pain, bool(pain or coded_pain or spinal_pain_condition)))

    # Pass 2: red flags. A Box 1 qualifier describes spinal pain when it says so, when it is written
    # on a spinal pain record, or when it names a pain without a site in a patient whose recent
    # back pain is on record (text.py, Mention.anchored).
    patient_context = "patient" if back_pain else None
    for item, recent, pain, spinal_pain_record in evidence_items:
        if not recent and item.resource_type in _NOTE_TYPES:
            continue  # history counts where it is recorded (problem list, observations), not in every old note
        rules = [r for r in term.rules if recent or (r.counts_history and not _closed_before(item, window_start))]
        if not rules:
            continue
        texts = _read_texts(term, item, "spinal" if spinal_pain_record else patient_context)
        for rule in rules:
            found = _flag_evidence(item, rule, texts) or (_pain_site_flag(rule, item, pain) if pain else None)
            if found:
                flags.setdefault(rule.id, []).append(found)

    for rule in term.rules:
        from_scores = _score_flag(rule, scores)
        if from_scores:
            flags.setdefault(rule.id, []).extend(from_scores)

    # A thoracic or cervical spinal pain is itself back pain (NG234 1.1 Box 1 (spinal pain)).
    back_pain += [e for e in flags.get(_SPINAL_PAIN_FLAG, []) if e.reference not in {b.reference for b in back_pain}]

    ordered_rules = sorted(term.rules, key=lambda r: -r.box)  # Box 2 (emergency) first, stable
    red_flags = [r.id for r in ordered_rules if r.id in flags]
    evidence = [e for flag in red_flags for e in flags[flag]]
    box2 = any(term.rule(f).box == 2 for f in red_flags)
    box1 = any(term.rule(f).box == 1 for f in red_flags)
    in_scope = bool(cancers) and (bool(back_pain) or box2)

    urgency = "none"
    if in_scope:
        urgency = "emergency" if box2 else "urgent" if box1 else "routine"

    # Suppression: a spine MRI completed after the newest evidence answers the question.
    evidence_dates = [e.date for e in evidence + back_pain if e.date is not None]
    newest = max(evidence_dates) if evidence_dates else None
    suppressed_by: list[str] = []
    pending: list[PendingOrder] = []
    xrays: list[SpineXray] = []
    for item in imaging:
        if not is_spine_mri(term, item):
            xray = _spine_xray(term, item, window_start)
            if xray:
                xrays.append(xray)
            continue
        if completed_mri(item) and newest is not None and item.date is not None and item.date > newest:
            suppressed_by.append(f"{item.resource_type}/{item.resource_id}")
        elif item.resource_type == "ServiceRequest" and item.status in _ORDER_PENDING:
            pending.append(PendingOrder(f"ServiceRequest/{item.resource_id}", item.status, item.due))
    if urgency != "none" and suppressed_by:
        urgency = "none"

    return Assessment(
        patient=record.patient,
        evaluated_at=now,
        urgency=urgency,
        in_scope=in_scope,
        cancers=cancers,
        back_pain=back_pain,
        red_flags=red_flags,
        evidence=evidence,
        suppressed_by=sorted(suppressed_by) if in_scope else [],
        pending_mri=pending if in_scope and not suppressed_by else [],
        problems=record.problems,
        rule_versions=term.versions,
        seen=record.seen,
        spine_xrays=xrays if in_scope else [],
    )
