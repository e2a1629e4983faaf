"""All SpineWatch settings: environment variables with the prefix SPINEWATCH_ (pydantic-settings).

Development defaults work out of the box; `environment=production` refuses placeholder secrets and
development-only switches. Every setting is documented in the README with its default. Secrets are
`SecretStr`: masked in repr, logs and dumps; `.get_secret_value()` only where one is used.

Over 300 lines on purpose: one class holds every SPINEWATCH_ setting with its description and
check, so the README's settings table is generated from one place.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRET = "dev-only-change-me"
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
# Production secrets (reviewer token, notification token, webhook secret): at least this long, with at
# least this many distinct characters, and no two the same (e.g. `openssl rand -hex 32`).
SECRET_MIN_LENGTH = 32
SECRET_MIN_DISTINCT = 10
# What a Subscription may watch: the types of the patient's record the workers read (workers/pipeline.py
# record_queries), whose resources name their patient (subject / patient) for the notification to route.
SUBSCRIBABLE_TYPES = ("Condition", "Observation", "DocumentReference", "DiagnosticReport", "ClinicalImpression",
                      "ServiceRequest", "Procedure", "ImagingStudy")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPINEWATCH_", extra="ignore")

    environment: Literal["development", "test", "production"] = Field(
        "development", description="development, test or production; production refuses placeholder secrets")
    # Clinical
    lookback_days: int = Field(90, ge=1, le=3650,
                               description="how far back (days) back-pain and red-flag evidence counts as recent")
    # Clinical notes (US Core Clinical Notes; workers/pipeline.py, service/infra/fhir/fetch.py, fhir_mappings evaluation)
    note_max_chars: int = Field(200_000, ge=1000, le=10_000_000,
                                description="longest note text read (characters); a longer note is named in "
                                            "`problems` and its first part still read")
    note_max_bytes: int = Field(2_000_000, ge=1024, le=100_000_000,
                                description="largest Binary (a note's content by reference) fetched from the FHIR "
                                            "server, bytes, by Content-Length and while reading; larger: not read, "
                                            "and the note is named in `problems`")
    note_max_binary_reads: int = Field(50, ge=0, le=1000,
                                       description="most Binary reads (note content by reference) for one "
                                                   "evaluation, newest notes first; the others are named in "
                                                   "`problems`; 0: none")
    # Operations (service/core/logging.py, service/api/routes/ops.py, spinewatch demo)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="log level: DEBUG, INFO, WARNING, ERROR or CRITICAL")
    log_format: Literal["json", "console"] = Field(
        "json", description="json (one JSON object a line, for log platforms) or console (for people)")
    readiness_timeout_seconds: float = Field(2.0, gt=0, le=30,
                                             description="time limit for each /readyz check (Redis, audit store, FHIR server)")
    demo_install: bool = Field(True, description="let `spinewatch demo` install redis-server with apt-get when it is "
                                                 "missing (only as root); false: print how to install it instead")
    # Alerts and audit (service/infra/audit/writer.py, service/api/routes/audit_events.py, workers/alerts.py)
    audit_enabled: bool = Field(True, description="record the audit log (switch off only for benchmark comparisons)")
    audit_db_url: str = Field("sqlite:///./var/audit.sqlite",
                              description="SQLAlchemy URL of the audit log: a SQLite file (its directory is created) "
                                          "or postgresql://user:pass@host/db")
    audit_hmac_key: SecretStr | None = Field(
        None, description="HMAC-SHA256 key of the audit chain (hash version 2): without it nobody can forge a record "
                          "or recompute a rolled-back head; one key for the life of a log (docs/audit.md); production: "
                          "required unless audit_hmac_disabled, at least 32 characters, 10 distinct, not shared")
    audit_hmac_disabled: bool = Field(False, description="production: deliberately run the audit chain unkeyed "
                                                         "(SHA-256 only) without audit_hmac_key")
    audit_head_export_path: str | None = Field(
        None, description="file that gets the audit log head (seq, hash) appended as a JSON line after every committed "
                          "batch, fsync'd: keep it where the database's users cannot write, for "
                          "`spinewatch audit verify --expect-head`")
    reviewer_token: SecretStr = Field(SecretStr(PLACEHOLDER_SECRET),
                                description="bearer token for GET /audit/events and the review page /audit; production: at "
                                            "least 32 characters, 10 distinct, not shared with another secret")
    reviewer_session_seconds: int = Field(28_800, ge=60, le=7 * 86_400,
                                          description="how long a review page session lasts after sign-in (seconds); "
                                                      "checked server-side, and the cookie's Max-Age")
    # Refused callers (service/usecases/auth_failures.py): per process, per surface
    auth_failure_limit: int = Field(30, ge=1, le=100_000,
                                    description="refused attempts a client address may make on one surface per minute; "
                                                "past it every call is answered 429 until the minute has passed")
    auth_failure_global_limit: int = Field(600, ge=1, le=1_000_000,
                                           description="refused attempts per minute on one surface from all clients "
                                                       "together; past it every call on that surface is answered 429")
    auth_failure_audit_per_window: int = Field(5, ge=0, le=10_000,
                                               description="refusals audited one by one per surface, reason and client "
                                                           "per minute; the rest are summarised in one auth-failure record")
    alert_default_recipient: str | None = Field(
        None, description="FHIR reference alerted when a patient has no active CareTeam and no generalPractitioner, "
                          "e.g. Organization/acute-oncology (no default: alerts with no recipient are dead-lettered)")
    alert_webhook_url: str | None = Field(None, description="optional webhook that also receives each alert (JSON)")
    alert_webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key for the webhook's X-SpineWatch-Signature header; required with "
                    "alert_webhook_url (production: at least 32 characters, 10 distinct, not shared)")
    alert_dedup_days: int = Field(90, ge=1, le=3650,
                                  description="how long an alert for the same patient, tier and evidence is remembered")
    alert_timeout_seconds: float = Field(10.0, gt=0, le=120, description="HTTP timeout (seconds) for the alert webhook")
    # The MRI clock (workers/pipeline/mri_clock.py, fhir_mappings/cds/mri_clock.py; docs/alerts.md "The MRI clock")
    mscc_coordinator: str | None = Field(
        None, description="FHIR reference of the MSCC coordinator, told when no spine MRI is ordered in time or the "
                          "deadline passes, e.g. PractitionerRole/mscc-coordinator (unset: the default recipient, "
                          "else whoever the alert went to)")
    mri_escalate_emergency_hours: float = Field(
        4.0, gt=0, le=24, description="suspected MSCC (24 h deadline): hours after the alert without a spine MRI "
                                      "ordered before the MSCC coordinator is told")
    mri_escalate_urgent_hours: float = Field(
        48.0, gt=0, le=168, description="suspected spinal metastasis (1 week deadline): hours after the alert "
                                        "without a spine MRI ordered before the MSCC coordinator is told")
    mri_clock_check_interval_seconds: int = Field(
        300, ge=0, description="how often open MRI clocks re-read their patient's orders and imaging and "
                               "escalate or breach when due (0 = no scheduled check: clocks move only when the "
                               "patient is evaluated)")
    mri_clock_watch_days: int = Field(
        30, ge=1, le=365, description="days a breached MRI clock is still watched for the MRI (to record when it "
                                      "was done) before it is closed as expired")
    # CDS Hooks (service/api/routes/hooks.py, service/usecases/hook.py, service/infra/jwt.py, service/infra/fhir/fetch.py;
    # docs/cds-hooks.md)
    cds_trusted_issuers: str | None = Field(
        None, description='JSON object: each trusted CDS client `iss` -> its JWKS (URL or file path), or -> '
                          '{"jwks": URL-or-path, "jku": [allowed jku URLs]}. Unset: in development only, the public '
                          'CDS Hooks sandbox (https://sandbox.cds-hooks.org); elsewhere nobody')
    cds_verify_jwt: bool = Field(True, description="verify the CDS client's bearer JWT; false is a development "
                                                   "switch that production refuses")
    public_base_url: str | None = Field(None, description="the service's external base URL, e.g. https://cds.example.org "
                                                          "(behind a proxy): JWT `aud` must equal it + the path called")
    jwt_clock_skew_seconds: int = Field(30, ge=0, le=300, description="clock skew allowed on JWT exp / iat")
    jwt_max_lifetime_seconds: int = Field(3600, ge=60, le=86400,
                                          description="longest CDS client JWT lifetime (exp - iat) accepted, and "
                                                      "oldest iat; longer or older: 401 (CDS Hooks recommends 300)")
    cds_jwks_cache_seconds: int = Field(300, ge=0, le=86400, description="how long a fetched JWKS is reused")
    cds_jti_redis_url: str | None = Field(None, description="Redis URL the API processes share: the JWT jti replay "
                                                            "cache and the signed-out reviewer sessions (required "
                                                            "by serve --workers N > 1); unset: in-memory, per process")
    fhir_allowed_hosts: str = Field("", description="comma-separated host[:port] list the service may fetch FHIR data "
                                                    "from (fhirServer, next links); empty: none (SSRF guard)")
    max_body_bytes: int = Field(10_485_760, ge=1024, description="largest CDS Hooks request body accepted (bytes); "
                                                                 "larger: 413")
    stored_assessment_max_age_seconds: int = Field(
        3600, ge=0, description="a stored assessment (workers) this young may answer a hook call that has neither "
                                "prefetch nor fhirServer; 0: never")
    cors_origins: str = Field("https://sandbox.cds-hooks.org",
                              description="comma-separated origins allowed to call /cds-services from a browser "
                                          "(CORS); * for any")
    card_intent: Literal["proposal", "plan", "order"] = Field(
        "proposal", description="intent of the MRI ServiceRequest a patient-view card suggests")
    # Card content (fhir_mappings/cds/wording.py CardSettings; docs/cards.md)
    mscc_coordinator_name: str | None = Field(
        None, description="who the emergency card tells the clinician to call, e.g. \"MSCC coordinator, St Elsewhere "
                          "acute oncology\"; unset: a generic line (acute oncology on call, through switchboard)")
    mscc_coordinator_phone: str | None = Field(None, description="the MSCC coordinator's phone number on the "
                                                                 "emergency card")
    mscc_coordinator_url: str | None = Field(None, description="a link to the local MSCC pathway or coordinator "
                                                               "page on the emergency card")
    mri_code_emergency: str = Field(
        "http://loinc.org|36531-2|MR Spine WO contrast",
        description="system|code|display of the whole-spine MRI the emergency card proposes (LOINC/RSNA Radiology "
                    "Playbook; no contrast for suspected MSCC); SNOMED CT 241645008 is always added")
    mri_code_urgent: str = Field(
        "http://loinc.org|36400-0|MR Spine WO and W contrast IV",
        description="system|code|display of the whole-spine MRI the urgent card proposes")
    mri_code_routine: str = Field(
        "http://loinc.org|36400-0|MR Spine WO and W contrast IV",
        description="system|code|display of the whole-spine MRI the routine card proposes")
    # The card's "Full evidence" link (service/infra/evidence_links.py, service/api/routes/evidence.py; docs/cards.md)
    evidence_links: bool = Field(True, description="give each card a \"Full evidence\" link to a page listing all "
                                                   "its findings (needs public_base_url); the URL is a capability "
                                                   "readable by whoever holds it until it expires; false: no link")
    evidence_link_ttl_seconds: int = Field(86_400, ge=1, le=7 * 86_400,
                                           description="how long a card's full-evidence link can be opened "
                                                       "(seconds); then 404")
    evidence_link_redis_url: str | None = Field(
        None, description="Redis URL that holds the full-evidence pages (shared by all processes; keys "
                          "spinewatch:evidence:<token>, expiring with the link); unset: in memory, per process, "
                          "at most 10,000")
    hook_timeout_seconds: float = Field(2.0, gt=0, le=30, description="time budget for fetching missing data from "
                                                                      "fhirServer; over it: 412, never a hang")
    hook_evaluation_timeout_seconds: float = Field(
        1.0, gt=0, le=30, description="time budget for evaluating one hook call's record (the rules, in a worker "
                                      "thread), after the data is had; over it: 412 naming the budget, never a hang")
    http_max_header_bytes: int = Field(
        16_384, ge=1024, le=1_048_576, description="`spinewatch serve`: most bytes of a request's line and headers "
                                                   "buffered (uvicorn h11_max_incomplete_event_size); more: the "
                                                   "request is refused (400) and the connection closed")
    http_keep_alive_seconds: int = Field(
        5, ge=1, le=300, description="`spinewatch serve`: an idle keep-alive connection is closed after this long "
                                     "(uvicorn timeout_keep_alive); uvicorn has no header-read timeout: run behind a "
                                     "proxy that has one (docs/operations.md)")
    # Terminology server (service/infra/fhir/terminology.py; fhir_mappings/clinical/valuesets/server/terminology-roots.yaml)
    terminology_url: str | None = Field(
        None, description="optional FHIR R4 terminology server base, e.g. https://tx.example.org/fhir: SNOMED CT codes "
                          "the local value sets do not classify are asked about (CodeSystem/$subsumes); it gets the "
                          "FHIR client's authentication only when it has the origin of fhir_base_url. Unset: the "
                          "local value sets alone")
    terminology_timeout_seconds: float = Field(1.0, gt=0, le=30, description="HTTP timeout (seconds) for each "
                                                                             "terminology server request")
    terminology_budget_seconds: float = Field(
        1.5, gt=0, le=30, description="most time (seconds) one evaluation waits for the terminology server; over it, "
                                      "or on any error: the local value sets alone, and a line in `problems`")
    terminology_cache_seconds: int = Field(86_400, ge=1, le=30 * 86_400,
                                           description="how long a terminology server answer (yes or no) is reused")
    terminology_concurrency: int = Field(4, ge=1, le=32, description="most terminology server requests in flight "
                                                                     "at once for one evaluation")
    # Subscriptions, queue and FHIR client (service/api/routes/notifications.py, service/usecases/intake.py, service/infra/queue/,
    # service/infra/fhir/sync.py, service/infra/fhir/subscriptions.py, workers/; docs/subscriptions.md)
    redis_url: str = Field("redis://127.0.0.1:6379/0",
                           description="Redis: Celery broker, notification de-duplication, stored assessments, "
                                       "dead letters (run it with appendonly yes: a queued event must survive a restart); "
                                       "or a Sentinel group: redis+sentinel://host1:26379,host2:26379/<master>/<db> "
                                       "(docs/deploy.md)")
    notification_token: SecretStr = Field(SecretStr(PLACEHOLDER_SECRET),
                                    description="secret the FHIR server sends with every notification "
                                                "(channel.header `Authorization: Bearer <it>`); compared in constant time; "
                                                "no `:` (refused: Medplum would cut it short); "
                                                "production: at least 32 characters, 10 distinct, not shared")
    notification_signature_secret: SecretStr | None = Field(
        None, description="when set, every notification must carry `X-Signature: hex(HMAC-SHA256(secret, body))` "
                          "(Medplum's subscription-secret extension, which `spinewatch subscribe` then sets); "
                          "unset: not checked")
    notification_max_bytes: int = Field(5_000_000, ge=1024, description="largest notification body accepted (bytes); "
                                                                        "larger: 413")
    fhir_base_url: str = Field("http://127.0.0.1:8080/fhir",
                               description="the EHR's FHIR R4 base the workers read from and `spinewatch subscribe` "
                                           "registers on")
    fhir_auth: Literal["none", "bearer", "smart-backend"] = Field(
        "none", description="how the workers authenticate to the FHIR server: none, bearer (a static token) or "
                            "smart-backend (SMART Backend Services, client_credentials + private_key_jwt)")
    fhir_bearer_token: SecretStr | None = Field(None, description="the static token for fhir_auth=bearer")
    smart_client_id: str | None = Field(None, description="SMART Backend Services client_id (fhir_auth=smart-backend)")
    smart_token_url: str | None = Field(None, description="token endpoint; unset: read from "
                                                          "{fhir_base_url}/.well-known/smart-configuration")
    smart_private_key_path: str | None = Field(None, description="PEM private key that signs the client assertion")
    smart_alg: Literal["RS384", "ES384"] = Field("RS384", description="client assertion algorithm: RS384 or ES384")
    smart_key_id: str | None = Field(None, description="`kid` of the signing key in the JWKS registered with the server")
    smart_scope: str | None = Field(None, description="scopes requested with the SMART Backend Services token; "
                                                      "unset: exactly what SpineWatch reads and writes "
                                                      "(fhir_mappings/fhir/scopes.py), in the syntax "
                                                      "SPINEWATCH_SMART_SCOPE_VERSION says; `spinewatch check-config` "
                                                      "shows it, and names what an explicit one lacks")
    # v2 by default: SMART App Launch 2.x is the current standard, and only v2 can ask for "search
    # and create" without also asking for update and delete (v1 `.write` is `.cud`).
    smart_scope_version: Literal["v1", "v2"] = Field(
        "v2", description="SMART scope syntax: v2 (`system/Communication.cs`, SMART App Launch 2.x) or v1 "
                          "(`system/Communication.read`, `.write`) for a server that knows only SMART 1.0 scopes")
    fhir_timeout_seconds: float = Field(10.0, gt=0, le=120, description="HTTP timeout (seconds) for each FHIR request")
    fhir_max_pages: int = Field(50, ge=1, le=10_000, description="most search pages followed for one search")
    record_max_resources_per_search: int = Field(
        10_000, ge=200, le=1_000_000,
        description="most resources one search of a patient's record reads (workers), newest first; past it, "
                    "or past fhir_max_pages, the evaluation goes on with what was read and names the rest in "
                    "`problems` (docs/resilience.md)")
    fhir_retry_after_max_seconds: float = Field(
        600.0, ge=0, le=3600, description="longest Retry-After (429/503) a task's next retry honours, even past "
        "its backoff; kept below the broker visibility timeout minus the task time limit (a waiting retry is "
        "held unacknowledged)")
    subscription_types: str = Field(
        "Condition,Observation",
        description="comma-separated resource types `spinewatch subscribe` subscribes to (one Subscription each) "
                    "and the reconciliation sweep looks at; add DocumentReference where the server notifies on "
                    "notes. Allowed: " + ", ".join(SUBSCRIBABLE_TYPES))
    subscription_endpoint: str = Field("http://127.0.0.1:8000/fhir/notifications",
                                       description="the public URL of POST /fhir/notifications, as the FHIR server "
                                                   "reaches it (channel.endpoint of the Subscriptions we create)")
    coalesce_seconds: float = Field(0.5, ge=0, le=300, description="events for one patient this close together "
                                                                   "are evaluated once (the evaluation waits this long)")
    task_max_retries: int = Field(5, ge=0, le=100, description="retries of a task after a transient FHIR error, "
                                                               "then the dead-letter list")
    task_retry_backoff_seconds: float = Field(2.0, gt=0, le=3600, description="first retry delay; doubles per retry, "
                                                                              "with jitter")
    task_time_limit_seconds: int = Field(300, ge=5, description="hard time limit of one task (the soft limit is 80 % "
                                                                "of it); must stay below the visibility timeout")
    # 900 s: a crashed worker's tasks come back within 15 min; it must exceed the task time limit
    # and the longest retry backoff (workers/tasks.py BACKOFF_CAP_SECONDS), both held unacknowledged.
    broker_visibility_timeout_seconds: int = Field(900, ge=10, description="Redis broker: an unacknowledged task is "
                                                                           "redelivered after this long")
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="port of the worker's own Prometheus "
                                     "/metrics (evaluations, alerts, dead letters are counted in worker "
                                     "processes); 0 = off")
    worker_metrics_host: str = Field("127.0.0.1", description="address the worker's /metrics listens on "
                                     "(0.0.0.0 in a container)")
    heartbeat_watchdog_seconds: int = Field(600, ge=1, description="no notification nor heartbeat from a "
                                                                   "Subscription for this long: ask its $status")
    subscription_activation_grace_seconds: int = Field(
        600, ge=0, description="a Subscription the server leaves `requested` longer than this is reported (no "
                               "notifications will arrive) and `spinewatch subscribe` and the watchdog ask for "
                               "`active`; longer than our backport heartbeat period, so a heartbeat reports the "
                               "activation first")
    reconciliation_interval_seconds: int = Field(900, ge=0, description="every so often, look for resources of "
                                                                        "the subscribed types changed since the last "
                                                                        "sweep (_lastUpdated), as a safety net; 0 = off")
    dedup_ttl_seconds: int = Field(7 * 86400, ge=60, description="how long a seen event number or resource version "
                                                                 "is remembered for de-duplication")

    @field_validator("notification_token")
    @classmethod
    def _header_safe_token(cls, value: SecretStr) -> SecretStr:
        # Medplum splits each channel.header value at ':' and keeps only the text up to the second
        # one (packages/server/src/workers/subscription.ts, buildRestHookHeaders), so the secret in
        # `Authorization: Bearer <it>` would arrive cut short and every notification be refused.
        if ":" in value.get_secret_value():
            raise ValueError("must not contain ':' (Medplum splits channel.header values at ':' and keeps only "
                             "the part up to the second ':', so the secret would arrive cut short and every "
                             "notification would be refused)")
        return value

    # URLs are plain strings above; refuse a wrong scheme here, at start-up, rather than at first use.
    @field_validator("redis_url", "cds_jti_redis_url", "evidence_link_redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # redis+sentinel://: a Sentinel group, parsed by service/infra/redis.py (docs/deploy.md "Redis Sentinel")
        if value and not value.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
            raise ValueError("must be a Redis URL: redis://, rediss://, unix:// or "
                             "redis+sentinel://host1:26379,host2:26379/<master name>/<db>")
        return value

    @field_validator("mri_code_emergency", "mri_code_urgent", "mri_code_routine")
    @classmethod
    def _coding(cls, value: str) -> str:
        parts = value.split("|")
        if len(parts) != 3 or not all(p.strip() for p in parts) or ":" not in parts[0]:
            raise ValueError("must be system|code|display, e.g. http://loinc.org|36531-2|MR Spine WO contrast")
        return value

    @field_validator("fhir_base_url", "subscription_endpoint", "public_base_url", "alert_webhook_url",
                     "mscc_coordinator_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not (value.startswith(("http://", "https://")) and value.split("://", 1)[1].strip("/")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("terminology_url")
    @classmethod
    def _terminology_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        cls._http_url(value)
        if "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("must not hold credentials (it gets the FHIR client's authentication on the same origin)")
        return value

    @field_validator("subscription_types")
    @classmethod
    def _subscription_types(cls, value: str) -> str:
        types = [t.strip() for t in value.split(",") if t.strip()]
        if not types:
            raise ValueError("must name at least one resource type, e.g. Condition,Observation")
        unknown = [t for t in types if t not in SUBSCRIBABLE_TYPES]
        if unknown:
            raise ValueError(f"unknown or unsupported resource type {unknown[0]!r}; allowed: "
                             + ", ".join(SUBSCRIBABLE_TYPES))
        if len(set(types)) != len(types):
            raise ValueError("names a resource type twice")
        return ",".join(types)

    @property
    def subscribed_types(self) -> tuple[str, ...]:
        return tuple(self.subscription_types.split(","))

    @field_validator("audit_db_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://", "postgres://")):
            raise ValueError("must be sqlite:///PATH or postgresql://user:password@host/database")
        return value

    @field_validator("cds_trusted_issuers")
    @classmethod
    def _trusted_issuers(cls, value: str | None) -> str | None:
        if value and value.strip():
            from service.core.trusted_issuers import parse_trusted_issuers

            parse_trusted_issuers(value, "production")  # its ValueError names what is wrong
        return value

    @model_validator(mode="after")
    def _fhir_auth_complete(self) -> "Settings":
        # Refused at start-up rather than at the first FHIR request, minutes or hours later.
        needs = {"bearer": ["fhir_bearer_token"], "smart-backend": ["smart_client_id", "smart_private_key_path"]}
        missing = ["SPINEWATCH_" + name.upper() for name in needs.get(self.fhir_auth, []) if not getattr(self, name)]
        if missing:
            raise ValueError(f"SPINEWATCH_FHIR_AUTH={self.fhir_auth} needs {' and '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _cds_hooks_production_rules(self) -> "Settings":
        # CDS Hooks 2.0 "Trusting CDS Clients": every call carries a signed JWT. Not verifying it is
        # for development only.
        if self.environment == "production" and not self.cds_verify_jwt:
            raise ValueError("production refuses SPINEWATCH_CDS_VERIFY_JWT=false")
        return self

    @model_validator(mode="after")
    def _refuse_placeholders_in_production(self) -> "Settings":
        if self.environment != "production":
            return self
        problems = [name for name in type(self).model_fields if _plain(getattr(self, name)) == PLACEHOLDER_SECRET]
        if problems:
            raise ValueError(f"production refuses placeholder secrets in: {', '.join('SPINEWATCH_' + p.upper() for p in problems)}")
        return self

    @model_validator(mode="after")
    def _refuse_weak_secrets_in_production(self) -> "Settings":
        # Names the setting and why, never the value. The webhook secret counts once a webhook is set.
        if self.environment != "production":
            return self
        names = ["reviewer_token", "notification_token"] + (["alert_webhook_secret"] if self.alert_webhook_url else [])
        names += [] if self.audit_hmac_disabled and not self.audit_hmac_key else ["audit_hmac_key"]
        problems, seen = [], {}
        for name in names:
            value = _plain(getattr(self, name)) or ""
            why = ("is empty" if not value.strip()
                   else f"is shorter than {SECRET_MIN_LENGTH} characters" if len(value) < SECRET_MIN_LENGTH
                   else f"has fewer than {SECRET_MIN_DISTINCT} distinct characters"
                   if len(set(value)) < SECRET_MIN_DISTINCT
                   else f"is the same as SPINEWATCH_{seen[value].upper()}" if value in seen else None)
            seen.setdefault(value, name)
            if why:
                problems.append(f"SPINEWATCH_{name.upper()} {why}")
        if problems:
            raise ValueError("production refuses weak secrets: " + "; ".join(problems)
                             + " (use e.g. `openssl rand -hex 32`)")
        return self

    @model_validator(mode="after")
    def _production_edges(self) -> "Settings":
        # CDS Hooks 2.0 "Trusting CDS Clients": the JWT `aud` must be the URL the EHR called, so
        # production names its own external https URL rather than trusting the Host header; http
        # only for a loopback host (a local trial of the production image). CORS `*` would let any
        # web page call the hooks from a clinician's browser.
        if self.environment != "production":
            return self
        problems = []
        url = self.public_base_url
        if not url:
            problems.append("SPINEWATCH_PUBLIC_BASE_URL is unset (the JWT aud would come from the Host header)")
        elif url.startswith("http://") and urlsplit(url).hostname not in _LOOPBACK:
            problems.append("SPINEWATCH_PUBLIC_BASE_URL must be https (http only for localhost)")
        if any(o.strip() == "*" for o in self.cors_origins.split(",")):
            problems.append("SPINEWATCH_CORS_ORIGINS must name origins, not *")
        if problems:
            raise ValueError("production refuses: " + "; ".join(problems))
        return self

def _plain(value):
    """A secret's value for the checks above (SecretStr hides it everywhere else: repr, logs, dumps)."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def evaluation_settings(settings: Settings, *, lookback_days: int | None = None):
    """The pure core's EvaluationSettings from ours: one place for the worker, the CDS Hooks service
    and `spinewatch evaluate`."""
    from fhir_mappings.clinical.evaluate import EvaluationSettings

    return EvaluationSettings(lookback_days=settings.lookback_days if lookback_days is None else lookback_days,
                              note_max_chars=settings.note_max_chars)


def card_settings(settings: Settings):
    """The pure core's CardSettings from ours (the CDS Hooks service and `spinewatch evaluate`)."""
    from fhir_mappings.cds.wording import CardSettings

    def coding(value: str) -> tuple[str, str, str]:
        system, code, display = (p.strip() for p in value.split("|"))
        return system, code, display

    return CardSettings(coordinator_name=settings.mscc_coordinator_name,
                        coordinator_phone=settings.mscc_coordinator_phone,
                        coordinator_url=settings.mscc_coordinator_url,
                        mri_codes={"emergency": coding(settings.mri_code_emergency),
                                   "urgent": coding(settings.mri_code_urgent),
                                   "routine": coding(settings.mri_code_routine)})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; invalid ones stop the process with one line per problem
    (service/core/config_check.py), before it serves or works."""
    try:
        return Settings()
    except ValidationError as exc:
        from service.core.config_check import InvalidSettings

        raise InvalidSettings(exc) from None
