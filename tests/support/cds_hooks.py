"""CDS Hooks test helpers: signing keys and JWTs, patient records per tier, hook requests, and a
validator for every response against the CDS Hooks 2.0 rules.

Keys are generated here with `cryptography` (ES384 on P-384, RS384 with 2048-bit RSA): no key
material is checked in.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"
BASE = "http://testserver"
PATIENT_VIEW = "spinewatch-patient-view"
ORDER_SELECT = "spinewatch-order-select"
ORDER_SIGN = "spinewatch-order-sign"
ORDER_SERVICES = {"order-select": ORDER_SELECT, "order-sign": ORDER_SIGN}
ORDER_IMAGING = "spinewatch-order-imaging"  # the old id of both order hooks: answered, not listed
# A hook call's fhirServer and fhirAuthorization (CDS Hooks 2.0 "FHIR Resource Access").
FHIR_SERVER = "https://fhir.example.org/r4"
FHIR_ACCESS_TOKEN = "opaque-fhir-access-token-42"
FHIR_AUTHORIZATION = {"access_token": FHIR_ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 300,
                      "scope": "user/*.read", "subject": "spinewatch"}
# What a FHIR server's GET [base]/metadata answers (R4 `capabilities` interaction): R4, and DSTU2,
# whose capability resource was still called Conformance (the SMART sandbox's r2 server says 1.0.2).
R4_METADATA = {"resourceType": "CapabilityStatement", "status": "active", "date": "2026-01-01", "kind": "instance",
               "fhirVersion": "4.0.1", "format": ["json"], "rest": [{"mode": "server"}]}
DSTU2_METADATA = {"resourceType": "Conformance", "status": "active", "date": "2026-01-01", "kind": "instance",
                  "fhirVersion": "1.0.2", "format": ["json"], "rest": [{"mode": "server"}]}
PREFETCH_TYPES = {"patient": "Patient", "conditions": "Condition", "observations": "Observation",
                  "diagnosticReports": "DiagnosticReport", "imagingStudies": "ImagingStudy",
                  "serviceRequests": "ServiceRequest", "procedures": "Procedure",
                  "documentReferences": "DocumentReference"}


# ---------------------------------------------------------------------------------------------
# Keys and tokens


@dataclass
class Issuer:
    """A CDS client: its `iss`, one signing key and the public JWK Set the service trusts."""

    iss: str
    alg: str = "ES384"
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self):
        if self.alg == "ES384":
            self.private_key = ec.generate_private_key(ec.SECP384R1())
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key()))
        else:
            self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private_key.public_key()))
        self.public_jwk = jwk | {"kid": self.kid, "alg": self.alg, "use": "sig"}
        self.public_pem = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def jwks(self) -> dict:
        return {"keys": [self.public_jwk]}

    def claims(self, aud: str, **overrides) -> dict:
        now = int(time.time())
        claims = {"iss": self.iss, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, aud: str, *, headers: dict | None = None, key=None, alg: str | None = None, **claims) -> str:
        header = {k: v for k, v in ({"kid": self.kid, "typ": "JWT"} | (headers or {})).items() if v is not None}
        return jwt.encode(self.claims(aud, **claims), key or self.private_key, algorithm=alg or self.alg,
                          headers=header)

    def auth(self, aud: str, **kw) -> dict:
        return {"Authorization": f"Bearer {self.token(aud, **kw)}"}


def url(path: str, base: str = BASE) -> str:
    return base.rstrip("/") + path


# ---------------------------------------------------------------------------------------------
# Patient records


def _ago(days: float, now: datetime | None = None) -> str:
    return ((now or datetime.now(timezone.utc)) - timedelta(days=days)).isoformat()


def _condition(pid: str, rid: str, system: str, code: str, display: str, days_ago: float, **extra) -> dict:
    return {"resourceType": "Condition", "id": rid,
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": extra.pop("clinical", "active")}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": "confirmed"}]},
            "code": {"coding": [{"system": system, "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{pid}"}, "onsetDateTime": _ago(days_ago)} | extra


def _note(pid: str, rid: str, text: str, days_ago: float) -> dict:
    return {"resourceType": "Observation", "id": rid, "status": "final", "code": {"text": "Clinical note"},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": _ago(days_ago), "valueString": text}


def _vital(pid: str, rid: str, days_ago: float) -> dict:
    return {"resourceType": "Observation", "id": rid, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": _ago(days_ago),
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}


def record(tier: str, pid: str = "p1", vitals: int = 0) -> list[dict]:
    """One patient's resources that evaluate to `tier` at the current time (NICE NG234 Box 2 / Box 1 tiers)."""
    out: list[dict] = [{"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1961-04-12"}]
    if tier != "none":
        out.append(_condition(pid, "cancer", SNOMED, "254837009", "Malignant neoplasm of breast", 900,
                              clinical="remission", abatementDateTime=_ago(500)))
    if tier == "emergency":
        out.append(_condition(pid, "back-pain", ICD10CM, "M54.50", "Low back pain, unspecified", 10))
        out.append(_note(pid, "neuro", "New bilateral leg weakness since yesterday.", 1))
    elif tier == "urgent":
        out.append(_condition(pid, "back-pain", ICD10CM, "M54.6", "Pain in thoracic spine", 10))
    else:  # routine, and none (no cancer)
        out.append(_condition(pid, "back-pain", ICD10CM, "M54.50", "Low back pain, unspecified", 10))
    out += [_vital(pid, f"vital-{i}", i % 60) for i in range(vitals)]
    return out


def as_dstu2(resources: list[dict], pid: str = "p1") -> list[dict]:
    """The same record as a FHIR DSTU2 server holds it (the CDS Hooks Sandbox's default server, the
    SMART launcher's r2): Condition.patient instead of subject, its statuses plain codes."""
    out = []
    for resource in resources:
        if resource["resourceType"] == "Condition":
            resource = {k: v for k, v in resource.items() if k not in ("subject", "clinicalStatus",
                                                                        "verificationStatus")}
            resource |= {"patient": {"reference": f"Patient/{pid}"}, "clinicalStatus": "active",
                         "verificationStatus": "confirmed"}
        out.append(resource)
    return out


def searchset(resources: list[dict], next_url: str | None = None) -> dict:
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
              "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def prefetch_for(resources: list[dict]) -> dict:
    """The prefetch a CDS client would send for our templates: a read for the patient, a searchset
    per search key, and null for a search that found nothing (2.0: "MUST have a value of null")."""
    out: dict[str, Any] = {}
    for key, rtype in PREFETCH_TYPES.items():
        found = [r for r in resources if r["resourceType"] == rtype]
        if rtype == "Patient":
            out[key] = found[0] if found else None
        else:
            out[key] = searchset(found) if found else None
    return out


def hook_request(hook: str, pid: str = "p1", prefetch: dict | None = None, **extra) -> dict:
    context: dict[str, Any] = {"userId": "Practitioner/dr-1", "patientId": pid}
    context.update(extra.pop("context", {}))
    body = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body | extra


# ---------------------------------------------------------------------------------------------
# Draft orders (order-select / order-sign)


def xray_order(pid: str = "p1", rid: str = "xr-1", intent: str = "order") -> dict:
    return {"resourceType": "ServiceRequest", "id": rid, "status": "draft", "intent": intent,
            "code": {"coding": [{"system": CPT, "code": "72100", "display": "X-ray exam of lower spine, 2 or 3 views"}],
                     "text": "XR lumbar spine 2-3 views"},
            "subject": {"reference": f"Patient/{pid}"}}


def mri_order(pid: str = "p1", rid: str = "mri-1") -> dict:
    return {"resourceType": "ServiceRequest", "id": rid, "status": "draft", "intent": "order",
            "code": {"coding": [{"system": LOINC, "code": "36400-0", "display": "MR Spine WO and W contrast IV"}]},
            "subject": {"reference": f"Patient/{pid}"}}


def unrelated_order(pid: str = "p1", rid: str = "med-1") -> dict:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "draft", "intent": "order",
            "medicationCodeableConcept": {"text": "Paracetamol 500 mg tablets"},
            "subject": {"reference": f"Patient/{pid}"}}


def draft_bundle(*orders: dict) -> dict:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": o} for o in orders]}


# ---------------------------------------------------------------------------------------------
# The response validator (CDS Hooks 2.0 §CDS Service Response, §Card Attributes, §Use of JSON)

INDICATORS = {"info", "warning", "critical"}
SELECTION = {"at-most-one", "any"}
ACTION_TYPES = {"create", "update", "delete"}


def assert_no_nulls_or_empties(value: Any, where: str = "$", allow_empty: tuple[str, ...] = ()) -> None:
    """2.0 §Use of JSON: "null, "", [], or {} are prohibited" unless the spec says otherwise."""
    assert value is not None, f"{where} is null"
    if isinstance(value, (str, list, dict)) and where not in allow_empty:
        assert len(value) > 0, f"{where} is empty"
    if isinstance(value, dict):
        for k, v in value.items():
            assert_no_nulls_or_empties(v, f"{where}.{k}", allow_empty)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_no_nulls_or_empties(v, f"{where}[{i}]", allow_empty)


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
        return True
    except ValueError:
        return False


def validate_cds_response(body: dict) -> list[dict]:
    """Check a hook response against the 2.0 rules; returns its cards."""
    assert set(body) <= {"cards", "systemActions"}, f"unexpected top-level keys {set(body)}"
    assert isinstance(body.get("cards"), list), "cards must be an array"
    assert_no_nulls_or_empties(body, allow_empty=("$.cards",))  # "no guidance": an empty array of cards
    uuids: list[str] = []
    for i, card in enumerate(body["cards"]):
        where = f"cards[{i}]"
        assert isinstance(card.get("summary"), str) and len(card["summary"]) < 140, f"{where}.summary must be < 140"
        assert card.get("indicator") in INDICATORS, f"{where}.indicator {card.get('indicator')!r}"
        assert isinstance(card.get("source"), dict) and isinstance(card["source"].get("label"), str), f"{where}.source"
        assert _is_uuid(card.get("uuid")), f"{where}.uuid must be a UUID (feedback needs it)"
        uuids.append(card["uuid"])
        if "detail" in card:
            assert isinstance(card["detail"], str)
        suggestions = card.get("suggestions")
        if suggestions is not None:
            assert card.get("selectionBehavior") in SELECTION, f"{where}: suggestions need selectionBehavior"
            recommended = [s for s in suggestions if s.get("isRecommended")]
            if card["selectionBehavior"] == "at-most-one":
                assert len(recommended) <= 1, f"{where}: at most one suggestion may be recommended"
            for j, s in enumerate(suggestions):
                assert isinstance(s.get("label"), str), f"{where}.suggestions[{j}].label"
                assert _is_uuid(s.get("uuid")), f"{where}.suggestions[{j}].uuid"
                uuids.append(s["uuid"])
                for k, action in enumerate(s.get("actions", [])):
                    at = f"{where}.suggestions[{j}].actions[{k}]"
                    assert action.get("type") in ACTION_TYPES, at
                    assert isinstance(action.get("description"), str), at
                    if action["type"] in ("create", "update"):
                        assert isinstance(action.get("resource"), dict) and action["resource"].get("resourceType"), at
                    if action["type"] == "delete":
                        # 2.0 §Action: resourceId, a *string* relative reference, SHOULD be given.
                        assert isinstance(action.get("resourceId"), str) and "/" in action["resourceId"], at
        else:
            assert "selectionBehavior" not in card or card["selectionBehavior"] in SELECTION
        for j, reason in enumerate(card.get("overrideReasons", [])):
            assert isinstance(reason.get("display"), str) and reason["display"], f"{where}.overrideReasons[{j}].display"
            assert isinstance(reason.get("code"), str), f"{where}.overrideReasons[{j}].code"
        for j, link in enumerate(card.get("links", [])):
            assert isinstance(link.get("label"), str) and isinstance(link.get("url"), str), f"{where}.links[{j}]"
            assert link.get("type") in ("absolute", "smart"), f"{where}.links[{j}].type"
            if "appContext" in link:
                assert link["type"] == "smart", f"{where}.links[{j}]: appContext only on smart links"
    assert len(uuids) == len(set(uuids)), "card and suggestion uuids must be unique"
    return body["cards"]


def validate_discovery(body: dict) -> None:
    assert isinstance(body.get("services"), list) and body["services"]
    assert_no_nulls_or_empties(body)
    for service in body["services"]:
        for required in ("hook", "description", "id"):
            assert isinstance(service.get(required), str), required
        for key, template in service.get("prefetch", {}).items():
            assert isinstance(template, str) and "{{context.patientId}}" in template, key


# ---------------------------------------------------------------------------------------------
# A service under test


class FakeStoredAssessments:
    """Stands in for service/infra/assessments.AssessmentStore (same `get`)."""

    def __init__(self, records: dict[str, dict] | None = None):
        self.records = records or {}
        self.calls: list[str] = []

    def get(self, patient_ref: str) -> dict | None:
        self.calls.append(patient_ref)
        return self.records.get(patient_ref)


@dataclass
class HookEnv:
    """The app with one trusted issuer (JWKS in a local file), an audit store in tmp_path, and a
    TestClient; `call`/`discover`/`feedback` sign a fresh JWT for the URL they call. The app writes
    its audit log as a serving process does (app.state.services.audit, in the background);
    `audit_records` flushes it first."""

    app: Any
    client: Any
    issuer: Issuer
    audit: Any
    base: str = BASE

    def headers(self, path: str, **token_kw) -> dict:
        return self.issuer.auth(url(path, self.base), **token_kw)

    def call(self, service: str, body: Any, **token_kw):
        path = f"/cds-services/{service}"
        return self.client.post(path, json=body, headers=self.headers(path, **token_kw))

    def discover(self, **token_kw):
        return self.client.get("/cds-services", headers=self.headers("/cds-services", **token_kw))

    def feedback(self, service: str, body: Any, **token_kw):
        path = f"/cds-services/{service}/feedback"
        return self.client.post(path, json=body, headers=self.headers(path, **token_kw))

    def flush_audit(self) -> None:
        self.app.state.services.audit.flush()

    def audit_records(self, kind: str) -> list:
        self.flush_audit()
        return [r for r in self.audit.iter_all() if r.kind == kind]


_ENVS: list[HookEnv] = []


def reset_audit() -> None:
    """After a test: let the apps made since the last reset finish writing their audit records."""
    while _ENVS:
        _ENVS.pop().flush_audit()


def make_env(tmp_path, *, issuer: Issuer | None = None, extra_issuers: dict | None = None,
             stored: FakeStoredAssessments | None = None, **settings) -> HookEnv:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.infra.audit.store import AuditStore
    from service.core.settings import Settings

    issuer = issuer or Issuer("https://ehr.example.org")
    jwks_path = tmp_path / f"jwks-{issuer.kid}.json"
    jwks_path.write_text(json.dumps(issuer.jwks))
    trusted = {issuer.iss: str(jwks_path)} | (extra_issuers or {})
    audit_url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    values = dict(environment="test", cds_trusted_issuers=json.dumps(trusted), audit_db_url=audit_url,
                  fhir_allowed_hosts="fhir.example.org", log_format="json") | settings
    app = create_app(Settings(**values))
    app.state.services.hooks.stored = stored
    env = HookEnv(app, TestClient(app), issuer, AuditStore(audit_url), base=values.get("public_base_url") or BASE)
    _ENVS.append(env)
    return env
