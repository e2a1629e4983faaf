"""Reading FHIR input: any Bundle type, NDJSON, compressed files, and clear one-line errors."""

import bz2
import gzip
import json

import pytest

from fhir_mappings.fhir.bundle import InputError, read_path, resources_from_json, split_by_patient

PATIENT = {"resourceType": "Patient", "id": "p1"}
CONDITION = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "urn:uuid:aaa"},
             "code": {"text": "low back pain"}}


@pytest.mark.parametrize("bundle_type", ["collection", "searchset", "transaction", "history", "batch"])
def test_every_bundle_type_is_unwrapped(bundle_type):
    bundle = {"resourceType": "Bundle", "type": bundle_type, "entry": [
        {"fullUrl": "urn:uuid:aaa", "resource": PATIENT},
        {"fullUrl": "urn:uuid:bbb", "resource": CONDITION},
        {"request": {"method": "DELETE", "url": "Observation/x"}},  # history delete: no resource
    ]}
    resources = resources_from_json(json.loads(json.dumps(bundle)))
    assert [r["resourceType"] for r in resources] == ["Patient", "Condition"]
    # urn:uuid references are resolved against the entries (FHIR R4 Bundle 3.3.1)
    assert resources[1]["subject"]["reference"] == "Patient/p1"
    assert list(split_by_patient(resources)) == ["Patient/p1"]


def test_ndjson_and_compressed_files(tmp_path):
    ndjson = "\n".join(json.dumps(r) for r in [PATIENT, {**CONDITION, "subject": {"reference": "Patient/p1"}}])
    (tmp_path / "a.ndjson").write_text(ndjson)
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(json.dumps(PATIENT).encode()))
    (tmp_path / "c.json.bz2").write_bytes(bz2.compress(json.dumps(PATIENT).encode()))
    assert len(read_path(tmp_path / "a.ndjson")) == 2
    assert read_path(tmp_path / "b.json.gz")[0]["id"] == "p1"
    assert read_path(tmp_path / "c.json.bz2")[0]["id"] == "p1"


@pytest.mark.parametrize("content, message", [
    ("", "empty input"),
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "no resourceType"),
    ('[1, 2]', "no resourceType"),
    ('{"resourceType": "Bundle", "entry": {}}', "Bundle.entry must be a list"),
    ('{"resourceType": "Patient"}\n{oops', "NDJSON line 2"),
])
def test_unreadable_input_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "in.json"
    path.write_text(content)
    with pytest.raises(InputError) as exc:
        read_path(path)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_path(tmp_path / "nope.json")
