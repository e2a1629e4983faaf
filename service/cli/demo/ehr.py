"""The demo EHR's side: the demo patients (service/cli/demo/data/*.json, dates relative to today),
writing them as an EHR would, calling patient-view as a CDS client, and reading back what
SpineWatch did (Communications, the stored tier, the audit log)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

from service.cli.demo.processes import DemoError

DATA_DIR = Path(__file__).parent / "data"


# ---------------- the demo EHR as a CDS client ----------------

class DemoEhrIssuer:
    """The demo EHR as a CDS client: an ES384 key, its JWK Set in a file the service is told to trust
    (SPINEWATCH_CDS_TRUSTED_ISSUERS), and a fresh signed JWT per call (CDS Hooks 2.0, "Trusting CDS
    Clients"), so the demo runs with JWT verification on, as production does."""

    iss = "https://ehr.demo.spinewatch.invalid"

    def __init__(self, run_dir: Path):
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec

        self._jwt = jwt
        self.key = ec.generate_private_key(ec.SECP384R1())
        self.kid = uuid.uuid4().hex[:12]
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        self.jwks_path = run_dir / "demo-ehr-jwks.json"
        self.jwks_path.write_text(json.dumps({"keys": [public | {"kid": self.kid, "alg": "ES384", "use": "sig"}]}))

    def trusted_issuers(self) -> str:
        return json.dumps({self.iss: str(self.jwks_path)})

    def token(self, audience: str, lifetime: int = 300) -> str:
        """A signed JWT for one call to `audience` (its jti is remembered: a token works once)."""
        return sign(self._jwt, self.key, self.kid, self.iss, audience, lifetime)

    def authorization(self, audience: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(audience)}"}

    def save_key(self) -> Path:
        """The signing key in the run directory (0600), for `python -m service.cli.demo.ehr token`
        while `spinewatch demo --serve` runs: a demo key, trusted only by the demo's own API."""
        from cryptography.hazmat.primitives import serialization

        path = self.jwks_path.with_name(KEY_FILE)
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return path


KEY_FILE = "demo-ehr-key.pem"
CURL_TOKEN_SECONDS = 1800  # the printed curl example's token: within SPINEWATCH_JWT_MAX_LIFETIME_SECONDS


def sign(jwt_module, key, kid: str, iss: str, audience: str, lifetime: int) -> str:
    now = int(time.time())
    return jwt_module.encode({"iss": iss, "aud": audience, "iat": now, "exp": now + lifetime,
                              "jti": uuid.uuid4().hex}, key, algorithm="ES384", headers={"kid": kid, "typ": "JWT"})


def patient_view_body(fhir_base: str, patient_id: str) -> dict:
    return {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "fhirServer": fhir_base,
            "context": {"userId": "Practitioner/sw-demo-gp", "patientId": patient_id}}


def curl_example(api: str, fhir_base: str, issuer: DemoEhrIssuer, patient_id: str) -> str:
    """A ready patient-view call as the demo EHR makes it, signed (one call, within 30 min)."""
    import shlex

    url = f"{api}/cds-services/{PATIENT_VIEW_SERVICE}"
    body = json.dumps(patient_view_body(fhir_base, patient_id), separators=(",", ":"))
    token = issuer.token(url, CURL_TOKEN_SECONDS)
    return (f"curl -sS -X POST {shlex.quote(url)} -H 'Content-Type: application/json' "
            f"-H {shlex.quote('Authorization: Bearer ' + token)} -d {shlex.quote(body)}")


def main(argv: list[str] | None = None) -> int:
    """`python -m service.cli.demo.ehr token --dir RUN_DIR URL`: a fresh demo-EHR JWT for one call
    to URL, while `spinewatch demo --serve` runs (its run directory holds the key and JWK Set)."""
    import argparse

    import jwt
    from cryptography.hazmat.primitives import serialization

    parser = argparse.ArgumentParser(prog="python -m service.cli.demo.ehr")
    parser.add_argument("command", choices=["token"])
    parser.add_argument("--dir", required=True, type=Path, help="the demo's run directory")
    parser.add_argument("url", help="the URL the token is for (the JWT aud), e.g. .../cds-services/spinewatch-patient-view")
    args = parser.parse_args(argv)
    try:
        key = serialization.load_pem_private_key((args.dir / KEY_FILE).read_bytes(), password=None)
        kid = json.loads((args.dir / "demo-ehr-jwks.json").read_text())["keys"][0]["kid"]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        print(f"spinewatch demo: no demo EHR key in {args.dir} ({type(exc).__name__}): is `spinewatch demo --serve` "
              f"running with that --dir?", file=sys.stderr)
        return 2
    # The command's one output, on stdout for the caller's `curl` (never a log line): a JWT signed
    # with the throwaway key of a development demo, for one URL, good once and for 5 minutes.
    print(sign(jwt, key, kid, DemoEhrIssuer.iss, args.url, 300))
    return 0


def demo_environment(run_dir: Path, redis_url: str, fhir_base: str, api_base: str,
                     issuer: DemoEhrIssuer) -> dict[str, str]:
    """The child processes' environment: the caller's, minus its SPINEWATCH_ settings, plus the
    demo's development settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")}
    fhir_host = fhir_base.split("://", 1)[1].split("/", 1)[0]
    env.update({
        "SPINEWATCH_ENVIRONMENT": "development",
        "SPINEWATCH_LOG_FORMAT": "json",
        "SPINEWATCH_REDIS_URL": redis_url,
        "SPINEWATCH_FHIR_BASE_URL": fhir_base,
        "SPINEWATCH_FHIR_ALLOWED_HOSTS": fhir_host,
        "SPINEWATCH_PUBLIC_BASE_URL": api_base,
        "SPINEWATCH_SUBSCRIPTION_ENDPOINT": f"{api_base}/fhir/notifications",
        "SPINEWATCH_NOTIFICATION_TOKEN": uuid.uuid4().hex,
        # sekmet notifies on notes too: one demo patient's emergency is written only in a note.
        "SPINEWATCH_SUBSCRIPTION_TYPES": "Condition,Observation,DocumentReference",
        "SPINEWATCH_CDS_TRUSTED_ISSUERS": issuer.trusted_issuers(),
        "SPINEWATCH_AUDIT_DB_URL": f"sqlite:///{run_dir / 'audit.sqlite'}",
        # Open MRI clocks checked every 2 s (production: 300), so the demo sees its MRI and its breach.
        "SPINEWATCH_MRI_CLOCK_CHECK_INTERVAL_SECONDS": "2",
        "PYTHONUNBUFFERED": "1",
    })
    return env


# ---------------- demo data ----------------

_DAYS_AGO = re.compile(r"^\$DAYS_AGO:(\d+)$")
_INSTANT_DAYS_AGO = re.compile(r"^\$INSTANT_DAYS_AGO:(\d+)$")  # for R4 `instant` fields (DocumentReference.date)
_SECONDS_AGO = re.compile(r"^\$SECONDS_AGO:(\d+)$")  # an instant: a clock's deadline within the demo's run


@dataclass
class DemoPatient:
    key: str
    title: str
    expected_tier: str
    chart: dict
    report: dict
    results: dict = field(default_factory=dict)

    @property
    def patient_id(self) -> str:
        return next(e["resource"]["id"] for e in self.chart["entry"] if e["resource"]["resourceType"] == "Patient")

    @property
    def reference(self) -> str:
        return f"Patient/{self.patient_id}"

    def resources(self) -> list[dict]:
        return [e["resource"] for e in self.chart["entry"] + self.report["entry"]]


def _resolve_dates(value: Any, today: datetime) -> Any:
    """Demo files date their events relative to today ("$DAYS_AGO:10" a date, "$INSTANT_DAYS_AGO:0"
    an instant, "$SECONDS_AGO:7200" an instant to the second), so the demo never goes stale against
    the 90-day lookback, and an MRI clock's 24 h deadline can fall within the run."""
    if isinstance(value, dict):
        return {k: _resolve_dates(v, today) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_dates(v, today) for v in value]
    if isinstance(value, str) and (m := _DAYS_AGO.match(value)):
        return (today - timedelta(days=int(m.group(1)))).date().isoformat()
    if isinstance(value, str) and (m := _INSTANT_DAYS_AGO.match(value)):
        return _instant(today - timedelta(days=int(m.group(1))))
    if isinstance(value, str) and (m := _SECONDS_AGO.match(value)):
        return _instant(today - timedelta(seconds=int(m.group(1))))
    return value


def _instant(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_demo_patients(now: datetime | None = None) -> list[DemoPatient]:
    now = now or datetime.now(timezone.utc)
    patients = []
    for path in sorted(DATA_DIR.glob("*.json")):
        doc = _resolve_dates(json.loads(path.read_text()), now)
        patients.append(DemoPatient(path.stem, doc["title"], doc["expected_tier"], doc["chart"], doc["report"]))
    return patients


def post_transaction(fhir: httpx.Client, bundle: dict) -> None:
    r = fhir.post("", json=bundle)
    if r.status_code >= 300:
        raise DemoError(f"the FHIR server refused a demo transaction: HTTP {r.status_code}")


# ---------------- what the demo shows ----------------

PATIENT_VIEW_SERVICE = "spinewatch-patient-view"


def patient_view(api: str, fhir_base: str, issuer: DemoEhrIssuer, patient: DemoPatient) -> list[dict]:
    """The CDS Hooks call an EHR makes when a clinician opens the chart (CDS Hooks 2.0 patient-view),
    with fhirServer so the service reads the record itself."""
    url = f"{api}/cds-services/{PATIENT_VIEW_SERVICE}"
    body = patient_view_body(fhir_base, patient.patient_id)
    r = httpx.post(url, json=body, headers=issuer.authorization(url), timeout=10.0)
    if r.status_code != 200:
        raise DemoError(f"patient-view for {patient.reference} answered HTTP {r.status_code}")
    return r.json()["cards"]


def communications(fhir: httpx.Client, patient: DemoPatient) -> list[dict]:
    r = fhir.get("/Communication", params={"subject": patient.reference, "_count": "100"})
    r.raise_for_status()
    return [e["resource"] for e in r.json().get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


def describe_communication(c: dict) -> str:
    to = ", ".join(r.get("reference", "?") for r in c.get("recipient", [])) or "nobody"
    text = next((p.get("contentString") for p in c.get("payload", []) if p.get("contentString")), "")
    text = text if len(text) <= 120 else text[:119] + "…"
    return f"Communication/{c.get('id')} to {to}, priority {c.get('priority', 'routine')}: {text}"


# ---------------- the MRI clock ----------------

MRI_WHOLE_SPINE = {"coding": [{"system": "http://loinc.org", "code": "36531-2", "display": "MR Spine WO contrast"}],
                   "text": "MRI whole spine"}  # the emergency card's own order (value set mri-spine)


def mri_done(patient: DemoPatient, at: datetime) -> dict:
    """What radiology writes when the whole-spine MRI is ordered and done: the order (FHIR R4
    ServiceRequest, active) and the study (ImagingStudy, available), both dated `at`."""
    pid, ref = patient.patient_id, patient.reference
    order = {"resourceType": "ServiceRequest", "id": f"{pid}-mri-order", "status": "active", "intent": "order",
             "priority": "stat", "code": MRI_WHOLE_SPINE, "subject": {"reference": ref}, "authoredOn": _instant(at)}
    study = {"resourceType": "ImagingStudy", "id": f"{pid}-mri", "status": "available", "subject": {"reference": ref},
             "started": _instant(at), "basedOn": [{"reference": f"ServiceRequest/{pid}-mri-order"}],
             "procedureCode": [MRI_WHOLE_SPINE],
             "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR"}]}
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                      for r in (order, study)]}


def clock_events(db_url: str) -> dict[str, list[dict]]:
    """The MRI clock's audit records (kind `mri-clock`, docs/alerts.md) by patient, oldest first."""
    from service.infra.audit.store import store_for

    store = store_for(db_url)
    try:
        records, _ = store.query(kinds=["mri-clock"], limit=10_000, newest_first=False)
    finally:
        store.dispose()
    by_patient: dict[str, list[dict]] = {}
    for record in records:
        by_patient.setdefault(record.patient, []).append(record.detail)
    return by_patient


def describe_clock(events: list[dict]) -> str:
    """The patient's latest MRI clock episode in one line: done in time, breached, closed or open."""
    if not events:
        return "none"
    latest = [e for e in events if e["episode"] == events[-1]["episode"]]
    by_event = {e["event"]: e for e in latest}
    tier, deadline = latest[-1]["tier"], datetime.fromisoformat(latest[-1]["deadline"])
    target = "24 h, NICE QS56" if tier == "emergency" else "1 week, NICE NG234"
    if "done" in by_event:
        done = datetime.fromisoformat(by_event["done"]["at"])
        hours = (done - datetime.fromisoformat(latest[0]["first_evidence_at"])).total_seconds() / 3600
        return f"{tier}: MRI done {hours:.1f} h after the first evidence (target {target}): " + \
            ("in time" if done <= deadline else "late")
    if "breached" in by_event:
        sent = by_event["breached"].get("communication")
        return (f"{tier}: no MRI by the deadline {_when(deadline)} (target {target}): breached, "
                + (f"breach alert {sent}" if sent else "recorded (the alert itself came after the deadline)"))
    if "closed" in by_event:
        return f"{tier}: closed ({by_event['closed']['reason']})"
    return f"{tier}: open, MRI due by {_when(deadline)} (target {target})"


def _when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def report_summary(report: dict) -> list[str]:
    """`spinewatch report`'s rows with patients flagged (a month is that of the first evidence), one
    line per month and tier, and each breach with its link to the patient's audit timeline."""
    lines = []
    for row in (r for r in report["rows"] if r["flagged"]):
        share = f"{row['met_share']:.0%}" if row["met_share"] is not None else "none judged yet"
        lines.append(f"{row['month']} {row['tier']}: {row['flagged']} flagged, {row['met']} of {row['denominator']} "
                     f"MRIs within {row['target_hours']} h ({share}), {row['open']} open, "
                     f"{len(row['breaches'])} breach(es)")
        lines += [f"  breach: {b['patient']}  {b['review_url']}" for b in row["breaches"]]
    return lines


def stored_tier(redis_url: str, patient: DemoPatient) -> str | None:
    """The tier the worker stored for the patient (service/infra/assessments.py) once its evaluation
    has read every resource of the new report (an earlier one may have seen only part of it)."""
    from service.infra.assessments import AssessmentStore
    from service.infra.queue import redis_client

    client = redis_client(redis_url)
    try:
        stored = AssessmentStore(client).get(patient.reference) or {}
    finally:
        client.close()
    report = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in patient.report["entry"]}
    return stored.get("urgency") if report <= set(stored.get("seen") or {}) else None


def audit_summary(db_url: str) -> dict:
    from service.infra.audit.store import store_for

    store = store_for(db_url)
    counts: dict[str, int] = {}
    for record in store.iter_all():
        counts[record.kind] = counts.get(record.kind, 0) + 1
    result = store.verify()
    store.dispose()
    return {"count": sum(counts.values()), "kinds": ", ".join(f"{k} {n}" for k, n in sorted(counts.items())),
            "ok": result.ok, "verification": f"{'verified' if result.ok else 'BROKEN'} ({result.message()})"}


if __name__ == "__main__":
    raise SystemExit(main())
