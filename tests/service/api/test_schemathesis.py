"""schemathesis against the service's OpenAPI, every operation (issue 7): no 5xx, no response that
contradicts the schema, whatever the input.

The app runs in process (ASGI) with a real Redis (notifications are queued for real) and a FHIR
server on a socket (so /readyz is ready and a fuzzed fhirServer cannot reach anything else: the
allowlist holds only that one).

The app's OpenAPI does not describe the bodies the CDS Hooks and notification handlers read
themselves (they read the raw request to refuse oversized bodies before parsing), so schemathesis
would send them empty. The schema fed to schemathesis is the app's own plus those request bodies,
taken from the handlers' pydantic models (CDS Hooks) and a FHIR Bundle/resource shape
(notifications); paths, parameters and responses are the app's.

Each call carries valid credentials for its surface (a fresh CDS client JWT with the right `aud`, the
notification secret, the reviewer token), so the fuzzing gets past authentication; the attack tests
(tests/service/api/test_attack.py) cover the credentials themselves. Example counts are small: the whole
run takes well under a minute.
"""

from __future__ import annotations

import copy
import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance  # noqa: E402

from tests.support.cds_hooks import Issuer  # noqa: E402
from tests.support.fault_stack import FhirStub  # noqa: E402

PUBLIC = "http://spinewatch.test"
NOTIFY_TOKEN = "schemathesis-notification-secret"
REVIEWER_TOKEN = "schemathesis-reviewer-token-0123456789"
ISSUER = Issuer("https://ehr.schemathesis.example.org")
MAX_EXAMPLES = 25
SERVICE_IDS = ("spinewatch-patient-view", "spinewatch-order-select", "spinewatch-order-sign",
               "spinewatch-order-imaging")  # the last: the old id of both order hooks, answered but not listed

_FHIR_RESOURCE = {"type": "object", "required": ["resourceType"],
                  "properties": {"resourceType": {"type": "string"}, "id": {"type": "string"},
                                 "type": {"type": "string"}, "entry": {"type": "array", "items": {"type": "object"}},
                                 "subject": {"type": "object", "properties": {"reference": {"type": "string"}}}},
                  "additionalProperties": True}


_MEDIA_TYPES = [("/metrics", ["text/plain"]), ("/audit/events", ["application/json", "application/fhir+json"]),
                ("/audit/verify", ["application/json"]), ("/audit/report.", ["text/csv", "application/json"]),
                ("/audit", ["text/html"]),
                ("/fhir/notifications", ["application/fhir+json"]),
                ("/feedback", [])]  # CDS Hooks 2.0 feedback: 200 with no body


def _json_body(schema: dict) -> dict:
    return {"required": False, "content": {"application/json": {"schema": schema}}}


def _with_bodies(openapi: dict) -> dict:
    from service.api.models.feedback import FeedbackRequest
    from service.api.models.hooks import HookRequest

    doc = copy.deepcopy(openapi)
    defs = doc.setdefault("components", {}).setdefault("schemas", {})

    def model_schema(model) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(schema.pop("$defs", {}))
        return schema

    paths = doc["paths"]
    paths["/cds-services/{service_id}"]["post"]["requestBody"] = _json_body(model_schema(HookRequest))
    paths["/cds-services/{service_id}/feedback"]["post"]["requestBody"] = _json_body(model_schema(FeedbackRequest))
    for method in ("post", "put"):
        paths["/fhir/notifications/{resource_type}/{resource_id}"][method]["requestBody"] = _json_body(_FHIR_RESOURCE)
    paths["/fhir/notifications"]["post"]["requestBody"] = _json_body(_FHIR_RESOURCE)
    # What the app serves besides JSON, which its OpenAPI does not say (FastAPI documents
    # application/json for every route whatever it returns): FHIR JSON, Prometheus text, HTML.
    for path, methods in paths.items():
        for method, op in methods.items():
            types = next((t for prefix, t in _MEDIA_TYPES if path.startswith(prefix) or path.endswith(prefix)), None)
            if types is not None:
                ok = op["responses"].setdefault("200", {"description": "OK"})
                ok.pop("content", None)
                if types:
                    ok["content"] = {t: {"schema": {}} for t in types}
    return doc


@pytest.fixture(scope="module")
def fhir():
    stub = FhirStub()
    yield stub
    stub.close()


@pytest.fixture
def api_schema(redis_url, tmp_path, fhir):
    from service.api.app import create_app
    from service.core.settings import Settings

    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(ISSUER.jwks))
    app = create_app(Settings(
        environment="test", redis_url=redis_url, fhir_base_url=fhir.base, fhir_allowed_hosts=fhir.host,
        notification_token=NOTIFY_TOKEN, reviewer_token=REVIEWER_TOKEN, public_base_url=PUBLIC,
        cds_trusted_issuers=json.dumps({ISSUER.iss: str(jwks)}), audit_db_url=f"sqlite:///{tmp_path / 'a.sqlite'}",
        hook_timeout_seconds=1.0, log_level="WARNING"))
    app.openapi_schema = _with_bodies(app.openapi())  # FastAPI serves the cached schema at /openapi.json
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def credentials(case) -> dict[str, str]:
    path = case.formatted_path
    if path.startswith("/cds-services"):
        return ISSUER.auth(PUBLIC + path)  # aud is the URL called; a fresh jti each time
    if path.startswith("/fhir/notifications"):
        return {"Authorization": f"Bearer {NOTIFY_TOKEN}"}
    if path.startswith("/audit"):
        return {"Authorization": f"Bearer {REVIEWER_TOKEN}"}
    return {}


# status_code_conformance is left out on purpose: the app answers 400/401/404/412/413 with
# OperationOutcomes (FHIR and CDS Hooks say so) that its OpenAPI does not list.
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def test_no_input_gets_a_5xx_or_a_response_outside_the_schema(api_schema):
    """Every operation, valid (positive) and invalid (negative) inputs. schemathesis' pytest
    integration (`from_fixture`) does not run under pytest 9, so hypothesis drives each operation
    here; a failure names the operation and the reproducing request."""
    from schemathesis import GenerationMode

    failures, fuzzed, statuses = [], [], {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        # Random service ids are all 404: the real ones too, so that the bodies reach the hooks.
        pinned = [{"service_id": sid} for sid in SERVICE_IDS] if "{service_id}" in operation.path else []
        for mode, path_parameters in [(m, p) for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                                      for p in [None, *pinned]]:
            @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                response = case.call_and_validate(headers=(case.headers or {}) | credentials(case), checks=CHECKS)
                statuses.setdefault(operation.label, set()).add(response.status_code)

            try:
                fuzz()
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE, operation.label  # nothing to make invalid
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collected, reported together below
                failures.append(f"{operation.label} [{mode.value}]: {type(exc).__name__}: {str(exc)[:1500]}")
        fuzzed.append(operation.label)
    assert len(fuzzed) == len({(m, p) for p, ops in api_schema.raw_schema["paths"].items() for m in ops}), fuzzed
    assert not failures, "\n\n".join(failures)
    print("\n".join(f"[schemathesis] {label}: {sorted(codes)}" for label, codes in sorted(statuses.items())))
    # The credentials worked: every authenticated surface answered something other than 401.
    for label, codes in statuses.items():
        assert codes - {401}, f"{label} only ever answered 401: the fuzzing never got past authentication"
