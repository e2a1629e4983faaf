"""The cards' "Full evidence" link, through the app: a hook call with SPINEWATCH_PUBLIC_BASE_URL set
answers a card whose link opens (GET) the page with every finding, with the security headers; an
unknown or expired link is a 404 page; no link without a public base URL or with links switched
off; the token is never logged nor audited; the Redis backend (a real redis-server) stores and
expires; Redis down: the card is served without the link."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from urllib.parse import urlsplit

import pytest

from tests.support.cds_hooks import (ORDER_IMAGING, PATIENT_VIEW, _note, draft_bundle, hook_request, make_env,
                                     prefetch_for, record, reset_audit, validate_cds_response, xray_order)
from tests.support.redis_server import free_port

BASE_URL = "https://cds.example.org"
HEADERS = {"cache-control": "no-store", "referrer-policy": "no-referrer", "x-content-type-options": "nosniff",
           "x-robots-tag": "noindex"}


@pytest.fixture
def env(tmp_path):
    env = make_env(tmp_path, public_base_url=BASE_URL)
    yield env
    reset_audit()


def patient_view(env, tier: str = "emergency", resources: list[dict] | None = None):
    body = hook_request("patient-view", "p1", prefetch_for(resources or record(tier, "p1")))
    response = env.call(PATIENT_VIEW, body)
    assert response.status_code == 200, response.text
    return body, validate_cds_response(response.json())


def evidence_links(card: dict) -> list[dict]:
    return [link for link in card.get("links", []) if link["label"].startswith("Full evidence")]


def the_link(card: dict) -> tuple[str, str]:
    [link] = evidence_links(card)
    assert link["type"] == "absolute"
    assert link["url"].startswith(BASE_URL + "/evidence/")
    token = link["url"].rsplit("/", 1)[1]
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", token)  # secrets.token_urlsafe(24)
    return link["url"], token


def open_link(env, url: str):
    return env.client.get(urlsplit(url).path)


def assert_security_headers(response):
    for name, value in HEADERS.items():
        assert response.headers[name] == value, name
    csp = response.headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in (p.strip() for p in csp.split(";")) if d}
    assert directives["default-src"] == ["'none'"] and directives["frame-ancestors"] == ["'self'"]
    assert "'unsafe-inline'" not in csp and "script-src" not in csp
    assert response.headers["content-type"].startswith("text/html")
    # the one style block is allowed by its hash, nothing else
    styles = re.findall(r"<style>(.*?)</style>", response.text, re.S)
    assert len(styles) == 1 and "style=" not in response.text
    digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
    assert directives["style-src"] == [f"'sha256-{digest}'"]


# ---------------------------------------------------------------- the link and its page


def test_card_link_opens_the_full_evidence(env):
    body, [card] = patient_view(env, "emergency")
    url, token = the_link(card)
    assert card["links"][0]["label"].startswith("ACR")  # the usual link stays first
    count = int(re.search(r"\((\d+) findings\)", evidence_links(card)[0]["label"]).group(1))
    page = open_link(env, url)
    assert page.status_code == 200
    assert_security_headers(page)
    text = page.text
    for words in ("Suspected spinal cord compression: whole-spine MRI within 24 h", "Whole-spine MRI within 24 h",
                  "New bilateral leg weakness since yesterday", "Low back pain, unspecified",
                  "Malignant neoplasm of breast", "Limb weakness", "What to do", "Emergency"):
        assert words in text, words
    assert text.count("<tr><td>") == count  # one row per finding, as many as the label says
    assert not re.search(r"\b(Condition|Observation|Patient)/[A-Za-z0-9\-.]+", text)  # no resource ids
    # audited: who the link was issued to, the patient, the hook call; never the token
    [viewed] = env.audit_records("evidence-view")
    assert viewed.actor == env.issuer.iss and viewed.patient == "Patient/p1" and viewed.outcome == "success"
    assert viewed.detail["hookInstance"] == body["hookInstance"] and viewed.detail["tier"] == "emergency"
    [served] = env.audit_records("card")
    assert served.detail.get("evidence_link") is True
    for record_ in env.audit.iter_all():
        assert token not in json.dumps(record_.detail) and token not in (record_.actor or "")


def test_order_sign_card_links_its_evidence_too(env):
    context = {"draftOrders": draft_bundle(xray_order("p1"))}
    body = hook_request("order-sign", "p1", prefetch_for(record("urgent", "p1")), context=context)
    response = env.call(ORDER_IMAGING, body)
    [card] = validate_cds_response(response.json())
    url, _ = the_link(card)
    page = open_link(env, url)
    assert page.status_code == 200 and "Whole-spine MRI within 1 week instead of the X-ray" in page.text
    assert "X-ray cannot exclude metastasis" in page.text


def test_patient_text_is_escaped_on_the_page(env):
    resources = record("routine", "p1") + [
        _note("p1", "xss", "New leg weakness <script>alert(1)</script> <b>since</b> yesterday.", 1)]
    _, [card] = patient_view(env, resources=resources)
    page = open_link(env, the_link(card)[0])
    assert page.status_code == 200 and "New leg weakness" in page.text
    assert "<script>" not in page.text and "<b>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


def test_unknown_token_is_a_404_page_that_echoes_nothing(env):
    patient_view(env)  # a real link exists; another token still opens nothing
    for token in (secrets.token_urlsafe(24), "not-a-token", "x" * 200, "%3Cscript%3E"):
        page = env.client.get(f"/evidence/{token}")
        assert page.status_code == 404, token
        assert_security_headers(page)
        assert "expired" in page.text and "reopen the patient" in page.text.lower()
        assert token not in page.text and "<script>" not in page.text
    assert env.audit_records("evidence-view") == []


def test_expired_link_is_a_404(env):
    store = env.app.state.services.hooks.evidence.store
    clock = [1000.0]
    store.clock = lambda: clock[0]
    _, [card] = patient_view(env)
    url, _ = the_link(card)
    ttl = env.app.state.services.settings.evidence_link_ttl_seconds
    assert ttl == 86_400  # the default
    clock[0] += ttl - 1
    assert open_link(env, url).status_code == 200
    clock[0] += 2  # past the TTL
    page = open_link(env, url)
    assert page.status_code == 404 and "expired" in page.text
    assert_security_headers(page)
    assert len(env.audit_records("evidence-view")) == 1  # only the page served


def test_no_link_for_tier_none(env):
    body = hook_request("patient-view", "p1", prefetch_for(record("none", "p1")))
    assert validate_cds_response(env.call(PATIENT_VIEW, body).json()) == []
    assert len(env.app.state.services.hooks.evidence.store) == 0  # nothing stored either


@pytest.mark.parametrize("settings", [{}, {"public_base_url": BASE_URL, "evidence_links": False}],
                         ids=["public_base_url unset", "links switched off"])
def test_no_link_without_public_base_url_or_when_switched_off(tmp_path, settings):
    env = make_env(tmp_path, **settings)
    try:
        assert env.app.state.services.hooks.evidence is None
        _, [card] = patient_view(env)
        assert evidence_links(card) == []
        assert [link["label"] for link in card["links"]] == ["ACR Appropriateness Criteria: Low Back Pain"]
        assert "evidence_link" not in env.audit_records("card")[0].detail
        assert env.client.get(f"/evidence/{secrets.token_urlsafe(24)}").status_code == 404
    finally:
        reset_audit()


def test_the_token_is_never_logged(env, caplog):
    caplog.set_level("INFO")
    store = env.app.state.services.hooks.evidence.store
    clock = [0.0]
    store.clock = lambda: clock[0]
    _, [card] = patient_view(env)
    url, token = the_link(card)
    assert open_link(env, url).status_code == 200
    clock[0] += 10 ** 6
    assert open_link(env, url).status_code == 404
    logged = caplog.text
    assert "evidence.viewed" in logged and "evidence.expired" in logged
    assert token not in logged and "/evidence/{token}" in logged  # the route template, not the path
    ours = [line for line in logged.splitlines() if "evidence." in line]
    assert len(ours) >= 2
    for line in ours:  # neither patient data nor the patient in the page's own log lines
        for secret in ("leg weakness", "Malignant neoplasm", "Patient/p1", token):
            assert secret not in line


# ---------------------------------------------------------------- the Redis backend


@pytest.mark.integration
def test_redis_backend_stores_with_the_ttl_and_expires(tmp_path, redis_url):
    import redis

    env = make_env(tmp_path, public_base_url=BASE_URL, evidence_link_redis_url=redis_url,
                   evidence_link_ttl_seconds=60)
    client = redis.Redis.from_url(redis_url)
    try:
        _, [card] = patient_view(env)
        url, token = the_link(card)
        key = f"spinewatch:evidence:{token}"
        assert client.keys("spinewatch:evidence:*") == [key.encode()]
        assert 0 < client.ttl(key) <= 60  # SETEX with the setting's TTL
        stored = json.loads(client.get(key))
        assert stored["view"]["tier"] == "emergency" and stored["meta"]["patient"] == "Patient/p1"
        page = open_link(env, url)  # any process sharing the Redis could open it
        assert page.status_code == 200 and "New bilateral leg weakness" in page.text
        client.pexpire(key, 1)  # as if the TTL had run out
        time.sleep(0.05)
        assert client.exists(key) == 0
        assert open_link(env, url).status_code == 404
    finally:
        client.close()
        reset_audit()


def test_redis_down_serves_the_card_without_the_link(tmp_path, caplog):
    caplog.set_level("INFO")
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = make_env(tmp_path, public_base_url=BASE_URL, evidence_link_redis_url=down)
    try:
        _, [card] = patient_view(env)
        assert card["indicator"] == "critical" and evidence_links(card) == []
        assert "evidence.link_not_stored" in caplog.text
        assert "leg weakness" not in caplog.text
        page = env.client.get(f"/evidence/{secrets.token_urlsafe(24)}")
        assert page.status_code == 503 and "reopen the patient" in page.text.lower()
        assert_security_headers(page)
    finally:
        reset_audit()


# ---------------------------------------------------------------- the store and the audit export


def test_memory_store_is_bounded_oldest_first_and_copies():
    from service.infra.evidence_links import MemoryEvidenceStore

    store = MemoryEvidenceStore(max_entries=3, clock=lambda: 0.0)
    record_ = {"view": {"tier": "urgent"}}
    for i in range(5):
        store.put(f"t{i}", record_, ttl=60)
    assert len(store) == 3 and store.get("t0") is None and store.get("t1") is None
    assert store.get("t4") == record_
    record_["view"]["tier"] = "changed"
    assert store.get("t4") == {"view": {"tier": "urgent"}}  # stored as JSON, not the caller's dict


def test_evidence_view_audit_record_exports_as_a_balp_patient_read(env):
    from fhir.resources.R4B.auditevent import AuditEvent

    from fhir_mappings.fhir.audit_events import BALP, audit_event

    _, [card] = patient_view(env)
    assert open_link(env, the_link(card)[0]).status_code == 200
    [viewed] = env.audit_records("evidence-view")
    event = audit_event(viewed.to_json())
    AuditEvent.model_validate(event)
    assert event["meta"]["profile"] == [BALP + "PatientRead"] and event["action"] == "R"
    assert {"reference": "Patient/p1"} in [e["what"] for e in event["entity"]]
