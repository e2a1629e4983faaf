"""A record larger than the cap on the real FHIR server sekmet-fhir: its `date` bounds, `_sort=-date`
and `_lastUpdated` ordering and its paging give the worker the newest Observations first, so the
red flag written last is read and the unread rest is named in `problems` (workers/pipeline/record.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from fhir_mappings.clinical.evaluate import assess
from service.infra.fhir.sync import FHIRClient
from tests.support import cds_hooks as ch
from tests.support.sekmet_server import SekmetServer
from workers import pipeline

pytestmark = pytest.mark.integration
VITALS = 450
CAP = 200


def heart_rate(pid: str, when: datetime) -> dict:
    return {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": ch.LOINC, "code": "8867-4", "display": "Heart rate"}]},
            "effectiveDateTime": when.isoformat(), "valueQuantity": {"value": 72, "unit": "/min"}}


def transaction(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}} for r in resources]}


def test_the_newest_part_of_a_large_record_is_read_from_a_real_server(sekmet_server: SekmetServer):
    now = datetime.now(timezone.utc)
    with sekmet_server.client() as http:
        answer = http.post("/Patient", json={"resourceType": "Patient", "gender": "female"})
        assert answer.status_code == 201, answer.text
        pid = answer.json()["id"]
        core = [{k: v for k, v in r.items() if k != "id"} | {"subject": {"reference": f"Patient/{pid}"}}
                for r in ch.record("emergency", pid) if r["resourceType"] != "Patient"]
        vitals = [heart_rate(pid, now - timedelta(days=2 + 80 * i / VITALS)) for i in range(VITALS)]
        # the vitals first, the leg weakness last: stored order alone would put it past the cap
        answer = http.post("", json=transaction(vitals + core))
        assert answer.status_code == 200, answer.text[:500]
    unread: list[str] = []
    with FHIRClient(sekmet_server.base_url) as fhir:
        resources = pipeline.fetch_record(fhir, f"Patient/{pid}", now, 90, max_per_search=CAP, unread=unread)
    assert unread == ["not every Observation was read: the newest 200 were, older ones were not (the record "
                      "is larger than one evaluation reads)"]
    read = {datetime.fromisoformat(r["effectiveDateTime"]) for r in resources if r["resourceType"] == "Observation"}
    # the `date` search: the note (a day ago) and the 199 newest vitals; the `_lastUpdated` one adds
    # others (a transaction writes them all at once), never more than its own cap
    newest = sorted((datetime.fromisoformat(v["effectiveDateTime"]) for v in vitals), reverse=True)[:CAP - 1]
    assert set(newest) <= read and CAP < len(read) <= 2 * CAP
    assert assess(resources, now).urgency == "emergency"
