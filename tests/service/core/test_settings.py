"""Invalid settings are refused at start-up with one line per problem: which setting and why."""

import subprocess
import sys
from pathlib import Path

import pytest

from service.core.config_check import InvalidSettings, shown_value
from service.core.settings import Settings, get_settings
from tests.support.paths import ROOT



@pytest.fixture
def fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def refusal(monkeypatch, **env) -> list[str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InvalidSettings) as info:
        get_settings()
    return info.value.lines


def test_defaults_are_valid_for_development(fresh_settings):
    assert get_settings().environment == "development"


def test_each_invalid_setting_is_named_with_its_reason(monkeypatch, fresh_settings):
    lines = refusal(monkeypatch, SPINEWATCH_LOOKBACK_DAYS="0", SPINEWATCH_LOG_FORMAT="xml")
    assert lines == [
        "invalid setting SPINEWATCH_LOOKBACK_DAYS='0': Input should be greater than or equal to 1",
        "invalid setting SPINEWATCH_LOG_FORMAT='xml': Input should be 'json' or 'console'",
    ]


def test_production_refuses_placeholder_secrets(monkeypatch, fresh_settings):
    (line,) = refusal(monkeypatch, SPINEWATCH_ENVIRONMENT="production")
    assert line.startswith("invalid settings: production refuses placeholder secrets in: SPINEWATCH_")


def test_values_of_secret_settings_are_never_echoed(monkeypatch, fresh_settings):
    monkeypatch.setenv("SPINEWATCH_AUDIT_DB_URL", "postgresql://u:hunter2@db/x")
    monkeypatch.setenv("SPINEWATCH_READINESS_TIMEOUT_SECONDS", "-1")
    for line in refusal(monkeypatch, SPINEWATCH_AUDIT_ENABLED="perhaps"):
        assert "hunter2" not in line


def test_the_process_stops_with_the_message_and_no_traceback():
    env = {"SPINEWATCH_LOOKBACK_DAYS": "ninety", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", "from service.api.app import create_app; create_app()"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("spinewatch: invalid setting SPINEWATCH_LOOKBACK_DAYS='ninety': "
                                   "Input should be a valid integer, unable to parse string as an integer")


def check_config(**env):
    return subprocess.run([sys.executable, "-m", "service.cli.main", "check-config"], capture_output=True,
                          text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, timeout=60)


def test_check_config_lists_every_setting_with_secrets_masked():
    proc = check_config(SPINEWATCH_AUDIT_DB_URL="postgresql://audit:hunter2@db/audit")
    assert proc.returncode == 0, proc.stderr
    names = [line.split("=", 1)[0] for line in proc.stdout.splitlines()]
    assert names == ["SPINEWATCH_" + f.upper() for f in Settings.model_fields]
    assert "SPINEWATCH_AUDIT_DB_URL=postgresql://audit:****@db/audit" in proc.stdout
    assert "hunter2" not in proc.stdout
    assert "configuration OK" in proc.stderr


def test_check_config_refuses_with_exit_2():
    proc = check_config(SPINEWATCH_LOG_LEVEL="loud")
    assert proc.returncode == 2
    assert proc.stderr.startswith("spinewatch: invalid setting SPINEWATCH_LOG_LEVEL='loud': ")


@pytest.mark.parametrize("field,value,shown", [
    ("reviewer_token", "abc", "****"),
    ("redis_url", "redis://:pw@host:6379/0", "redis://:****@host:6379/0"),
    ("lookback_days", 90, "90"),
    ("alert_webhook_url", None, "(unset)"),
])
def test_shown_value(field, value, shown):
    assert shown_value(field, value) == shown


@pytest.mark.parametrize("env,value,reason", [
    ("SPINEWATCH_REDIS_URL", "localhost:6379", "must be a Redis URL"),
    ("SPINEWATCH_FHIR_BASE_URL", "ehr.example.org/fhir", "must be an http:// or https:// URL"),
    ("SPINEWATCH_SUBSCRIPTION_ENDPOINT", "https:///", "must be an http:// or https:// URL"),
    ("SPINEWATCH_AUDIT_DB_URL", "mysql://audit@db/audit", "must be sqlite:///PATH or postgresql://"),
])
def test_urls_with_a_wrong_scheme_are_refused_without_echoing_them(monkeypatch, fresh_settings, env, value, reason):
    (line,) = refusal(monkeypatch, **{env: value})
    assert line.startswith(f"invalid setting {env}: {reason}")
    assert value not in line


def test_settings_that_need_each_other_are_refused_together(monkeypatch, fresh_settings):
    (line,) = refusal(monkeypatch, SPINEWATCH_FHIR_AUTH="smart-backend", SPINEWATCH_SMART_CLIENT_ID="spinewatch")
    assert line == "invalid settings: SPINEWATCH_FHIR_AUTH=smart-backend needs SPINEWATCH_SMART_PRIVATE_KEY_PATH"


def test_trusted_issuers_must_be_a_json_object_of_jwks(monkeypatch, fresh_settings):
    (line,) = refusal(monkeypatch, SPINEWATCH_CDS_TRUSTED_ISSUERS="https://ehr.example.org")
    assert line.startswith("invalid setting SPINEWATCH_CDS_TRUSTED_ISSUERS")
    assert line.endswith("is not valid JSON")


# -- production refuses empty, short, low-variety or shared secrets ---------------

STRONG_A = "9f3c1a7e5b2d8046f1e9c3a5b7d2e4f60a1b"
STRONG_B = "Zx81-Qw72_Lp45.Mn36+Kj27=Hg18!Fd09"
STRONG_C = "c0ffee-4d1e-4b2f-9a8c-7e6d5c4b3a29"
STRONG_D = "7Hq2-Rt5w_Yu8e.Io1p+As4d=Fg7h!Jk0l"


@pytest.mark.parametrize("value,why", [
    ("", "is empty"),
    ("x", "is shorter than 32 characters"),
    ("a" * 64, "has fewer than 10 distinct characters"),
    ("ab" * 20, "has fewer than 10 distinct characters"),
])
def test_production_refuses_weak_secrets_by_name_never_by_value(monkeypatch, fresh_settings, value, why):
    (line,) = refusal(monkeypatch, SPINEWATCH_ENVIRONMENT="production", SPINEWATCH_REVIEWER_TOKEN=value,
                      SPINEWATCH_NOTIFICATION_TOKEN=STRONG_B)
    assert line.startswith(f"invalid settings: production refuses weak secrets: SPINEWATCH_REVIEWER_TOKEN {why}")
    if len(value) > 1:  # the value is never echoed
        assert value not in line


def test_production_refuses_a_secret_shared_by_two_settings(monkeypatch, fresh_settings):
    (line,) = refusal(monkeypatch, SPINEWATCH_ENVIRONMENT="production", SPINEWATCH_REVIEWER_TOKEN=STRONG_A,
                      SPINEWATCH_NOTIFICATION_TOKEN=STRONG_A)
    assert "SPINEWATCH_NOTIFICATION_TOKEN is the same as SPINEWATCH_REVIEWER_TOKEN" in line
    assert STRONG_A not in line


def test_production_webhook_secret_counts_only_with_a_webhook(monkeypatch, fresh_settings):
    monkeypatch.setenv("SPINEWATCH_ENVIRONMENT", "production")
    monkeypatch.setenv("SPINEWATCH_REVIEWER_TOKEN", STRONG_A)
    monkeypatch.setenv("SPINEWATCH_NOTIFICATION_TOKEN", STRONG_B)
    monkeypatch.setenv("SPINEWATCH_PUBLIC_BASE_URL", "https://cds.example.org")
    monkeypatch.setenv("SPINEWATCH_AUDIT_HMAC_KEY", STRONG_D)
    assert get_settings().environment == "production"
    get_settings.cache_clear()
    (line,) = refusal(monkeypatch, SPINEWATCH_ALERT_WEBHOOK_URL="https://hooks.example.org/x",
                      SPINEWATCH_ALERT_WEBHOOK_SECRET="short")
    assert "SPINEWATCH_ALERT_WEBHOOK_SECRET is shorter than 32 characters" in line
    get_settings.cache_clear()
    monkeypatch.setenv("SPINEWATCH_ALERT_WEBHOOK_SECRET", STRONG_B)
    (line,) = refusal(monkeypatch)
    assert "SPINEWATCH_ALERT_WEBHOOK_SECRET is the same as SPINEWATCH_NOTIFICATION_TOKEN" in line
    get_settings.cache_clear()
    monkeypatch.setenv("SPINEWATCH_ALERT_WEBHOOK_SECRET", STRONG_C)
    assert get_settings().alert_webhook_secret.get_secret_value() == STRONG_C


@pytest.mark.parametrize("reviewer", ["", "x", STRONG_B])
def test_check_config_exits_2_on_a_weak_or_shared_production_secret(reviewer):
    proc = check_config(SPINEWATCH_ENVIRONMENT="production", SPINEWATCH_REVIEWER_TOKEN=reviewer,
                        SPINEWATCH_NOTIFICATION_TOKEN=STRONG_B)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "SPINEWATCH_REVIEWER_TOKEN" in line or "SPINEWATCH_NOTIFICATION_TOKEN is the same" in line
    assert STRONG_B not in line and "Traceback" not in proc.stderr


def test_secrets_never_show_in_repr_or_dumps():
    secret = "s3cret-" + "q" * 40
    settings = Settings(environment="test", reviewer_token=secret, notification_token=secret + "n",
                        alert_webhook_secret=secret + "w", fhir_auth="bearer", fhir_bearer_token=secret + "b")
    assert secret not in repr(settings) and secret not in str(settings.model_dump())
    assert settings.reviewer_token.get_secret_value() == secret
    assert settings.fhir_bearer_token.get_secret_value() == secret + "b"


# -- production refuses a missing or plain-http public URL, and CORS * -------------

@pytest.mark.parametrize("env, expected", [
    ({}, "SPINEWATCH_PUBLIC_BASE_URL is unset"),
    ({"SPINEWATCH_PUBLIC_BASE_URL": "http://cds.example.org"}, "SPINEWATCH_PUBLIC_BASE_URL must be https"),
    ({"SPINEWATCH_PUBLIC_BASE_URL": "https://cds.example.org", "SPINEWATCH_CORS_ORIGINS": "https://a.example.org, *"},
     "SPINEWATCH_CORS_ORIGINS must name origins, not *"),
])
def test_production_refuses_an_unset_or_http_public_url_and_cors_star(monkeypatch, fresh_settings, env, expected):
    (line,) = refusal(monkeypatch, SPINEWATCH_ENVIRONMENT="production", SPINEWATCH_REVIEWER_TOKEN=STRONG_A,
                      SPINEWATCH_NOTIFICATION_TOKEN=STRONG_B, SPINEWATCH_AUDIT_HMAC_KEY=STRONG_D, **env)
    assert line.startswith("invalid settings: production refuses: ") and expected in line


@pytest.mark.parametrize("url", ["https://cds.example.org", "http://localhost:8000", "http://127.0.0.1:8000"])
def test_production_takes_an_https_or_loopback_public_url(url):
    settings = Settings(environment="production", reviewer_token=STRONG_A, notification_token=STRONG_B,
                        audit_hmac_key=STRONG_D, public_base_url=url, _env_file=None)
    assert settings.public_base_url == url


# -- a notification token Medplum would cut short ---------------------------------

@pytest.mark.parametrize("environment", ["development", "test", "production"])
def test_a_notification_token_with_a_colon_is_refused_in_every_environment(monkeypatch, fresh_settings, environment):
    token = "Zx81-Qw72_Lp45.Mn36:Kj27=Hg18!Fd09"  # strong, but Medplum would send only "Zx81-Qw72_Lp45.Mn36"
    lines = refusal(monkeypatch, SPINEWATCH_ENVIRONMENT=environment, SPINEWATCH_REVIEWER_TOKEN=STRONG_A,
                    SPINEWATCH_NOTIFICATION_TOKEN=token, SPINEWATCH_AUDIT_HMAC_KEY=STRONG_D)
    assert "invalid setting SPINEWATCH_NOTIFICATION_TOKEN: must not contain ':' (Medplum splits channel.header " \
           "values at ':' and keeps only the part up to the second ':', so the secret would arrive cut short and " \
           "every notification would be refused)" in lines
    assert not any(token in line or "Kj27" in line for line in lines)
