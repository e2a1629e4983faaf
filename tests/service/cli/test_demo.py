"""`spinewatch demo` run as a user runs it: what it reports, and that it leaves no process behind."""

import base64
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support.paths import ROOT

SPINEWATCH = Path(sys.executable).parent / "spinewatch"

pytestmark = pytest.mark.integration


def processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or environment holds `text` (the demo's run directory: redis and
    sekmet take it as an argument, the API and worker in SPINEWATCH_AUDIT_DB_URL)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline or text.encode() in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"{pid}: {command}")
    return found


def demo_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINEWATCH_")}
    env["SPINEWATCH_DEMO_INSTALL"] = "false"  # tests never install packages
    return env


def test_demo_shows_the_whole_flow_and_stops_everything(tmp_path):
    run_dir = tmp_path / "demo"
    proc = subprocess.run([str(SPINEWATCH), "demo", "--dir", str(run_dir)], capture_output=True, text=True,
                          cwd=ROOT, env=demo_env(), timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr

    tiers = dict(re.findall(r"(Patient/sw-demo-\w+)\b.*\n\s+tier: (\w+) \(expected", out))
    assert tiers == {"Patient/sw-demo-emergency": "emergency", "Patient/sw-demo-urgent": "urgent",
                     "Patient/sw-demo-routine": "routine", "Patient/sw-demo-quiet": "none",
                     "Patient/sw-demo-note": "emergency"}, out
    cards = dict(re.findall(r"(Patient/sw-demo-\w+)\b(?:.*\n){2}\s+patient-view card: (\[\w+\]|none)", out))
    assert cards == {"Patient/sw-demo-emergency": "[critical]", "Patient/sw-demo-urgent": "[warning]",
                     "Patient/sw-demo-routine": "[info]", "Patient/sw-demo-quiet": "none",
                     "Patient/sw-demo-note": "[critical]"}, out
    alerts = {p: int(n) for p, n in re.findall(r"(Patient/sw-demo-\w+)\b(?:.*\n){3}\s+care-team alerts on the EHR: (\d+)", out)}
    assert alerts["Patient/sw-demo-emergency"] >= 1 and alerts["Patient/sw-demo-urgent"] >= 1, out
    assert alerts["Patient/sw-demo-note"] >= 1, out  # the emergency written only in a note
    assert alerts["Patient/sw-demo-routine"] == 0 and alerts["Patient/sw-demo-quiet"] == 0, out
    clocks = dict(re.findall(r"(Patient/sw-demo-\w+)\b(?:.*\n)+?\s+MRI clock: (.+)", out))
    assert re.fullmatch(r"emergency: MRI done 2\.\d h after the first evidence .*: in time",
                        clocks["Patient/sw-demo-emergency"]), out
    assert re.search(r"breached, breach alert Communication/\S+$", clocks["Patient/sw-demo-note"]), out
    assert clocks["Patient/sw-demo-urgent"].startswith("urgent: open"), out
    assert clocks["Patient/sw-demo-routine"] == clocks["Patient/sw-demo-quiet"] == "none", out
    assert alerts["Patient/sw-demo-note"] == 2, out  # the alert, then the breach alert
    assert re.search(r"^\s+breach: Patient/sw-demo-note  http://127\.0\.0\.1:\d+/audit\?patient=Patient%2Fsw-demo-note$",
                     out, re.M), out
    assert re.search(r"^Audit log: \d+ records .*mri-clock \d+.*; hash chain: verified", out, re.M), out
    assert "Not shown yet" not in out
    assert out.rstrip().endswith("stopped.")
    assert processes_mentioning(str(run_dir)) == []
    assert_logs_hold_no_patient_data(run_dir / "logs")


def assert_logs_hold_no_patient_data(log_dir: Path):
    """The API's and worker's logs: JSON lines with ids, never the demo patients' names, birth dates,
    free text, or the EHR's JWTs."""
    from service.cli.demo.ehr import load_demo_patients

    forbidden = {"eyJ"}
    for p in load_demo_patients():
        for resource in p.resources():
            if resource["resourceType"] == "Patient":
                forbidden |= {resource["birthDate"], *(n["family"] for n in resource["name"])}
            if resource.get("valueString"):
                forbidden.add(resource["valueString"][:30])
            if resource.get("code", {}).get("text"):
                forbidden.add(resource["code"]["text"])
            for content in resource.get("content", []) if resource["resourceType"] == "DocumentReference" else []:
                data = content["attachment"].get("data")
                if data:  # a note's text, decoded or not, never reaches a log
                    forbidden |= {data[:30], base64.b64decode(data).decode()[:30]}
    for name in ("api.log", "worker.log"):
        text = (log_dir / name).read_text()
        assert '"request_id"' in text or '"task_id"' in text, name
        assert not [word for word in forbidden if word in text], name


def test_demo_serve_stops_everything_on_ctrl_c(tmp_path):
    run_dir = tmp_path / "serve"
    proc = subprocess.Popen([str(SPINEWATCH), "demo", "--serve", "--dir", str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=demo_env())
    lines = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops everything") or time.monotonic() > deadline:
                break
        assert any(line.startswith("Serving until Ctrl-C") for line in lines), "".join(lines)
        assert processes_mentioning(str(run_dir))  # the services are up ...
        served = "".join(lines)
        assert_serve_says_how_to_use_it(served)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        rest = proc.stdout.read()  # not communicate(): it would skip what the line iterator buffered
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert re.search(r"SpineWatch API\s+http://127\.0\.0\.1:\d+", text), text
    assert proc.returncode == 130 and text.rstrip().endswith("stopped."), text
    assert processes_mentioning(str(run_dir)) == []  # ... and gone after Ctrl-C


def assert_serve_says_how_to_use_it(served: str):
    """The review page with its token, the OpenAPI document, and a signed hook call that works as
    printed; a second call needs a fresh token (the helper printed mints one)."""
    import httpx

    api = re.search(r"SpineWatch API\s+(http://127\.0\.0\.1:\d+)", served).group(1)
    assert re.search(rf"review page\s+{api}/audit\s+\(reviewer token: dev-only-change-me", served), served
    assert httpx.get(re.search(r"OpenAPI\s+(\S+)", served).group(1)).json()["info"]["title"] == "SpineWatch"
    assert "/docs" not in served
    curl = next(line.strip() for line in served.splitlines() if line.strip().startswith("curl "))
    done = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and '"indicator":"critical"' in done.stdout.replace(" ", ""), done.stdout + done.stderr
    helper = next(line.strip() for line in served.splitlines() if "-m service.cli.demo.ehr token" in line)
    token = subprocess.run(helper, shell=True, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert token.returncode == 0, token.stderr
    url = helper.rsplit(" ", 1)[1]
    body = re.search(r"-d '(.*)'$", curl).group(1)
    again = httpx.post(url, content=body, headers={"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {token.stdout.strip()}"}, timeout=30)
    assert again.status_code == 200 and again.json()["cards"][0]["indicator"] == "critical", again.text


def test_demo_without_redis_says_how_to_get_it(tmp_path):
    env = demo_env()
    env["PATH"] = str(Path(sys.executable).parent)  # no redis-server on PATH, installing forbidden
    proc = subprocess.run([str(SPINEWATCH), "demo", "--dir", str(tmp_path / "d")], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 1
    assert "redis-server is not installed" in proc.stdout
    assert "apt-get install redis-server" in proc.stdout
    assert processes_mentioning(str(tmp_path / "d")) == []
