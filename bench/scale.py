"""How the evaluation scales with the size of a patient's record (docs/resilience.md, "Very large records").

Records of 10, 100, 1,000, 10,000 and 100,000 resources: a cancer Condition, a back-pain Condition, a
red flag (new leg weakness, a day ago) and heart-rate Observations spread over the last 80 days, all in
the lookback window (the worst case for the cap). A minimal FHIR R4 stand-in serves them over HTTP on
127.0.0.1 from its own process (paging with `_count`/`_offset`, `_sort` on date or `_lastUpdated`, `ge`
date bounds; every page pre-encoded, so the stand-in's own speed is not what is measured), and answers
an alert's Communication create. Each size is evaluated through the worker path
(workers.pipeline.evaluate_patient with real collaborators: FHIRClient, a real redis-server, the audit
log) in a fresh process of its own, so its peak RSS is its own. Printed per size: wall and CPU time,
peak RSS (and the RSS before the evaluation), resources read, tier, the `problems` entries naming what
was left unread, and the time per resource relative to the 1,000 size.

With --hook, the same record also goes through the CDS Hooks path (service.usecases.hook.assess_patient)
as a prefetch of that size, in a fresh process too; the hook path has no cap (the CDS client chose
what to prefetch) but its evaluation budget (SPINEWATCH_HOOK_EVALUATION_TIMEOUT_SECONDS) applies.

    python bench/scale.py [--sizes 10,100,1000,10000,100000] [--cap N] [--migrated] [--hook]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (10, 100, 1_000, 10_000, 100_000)
LOINC, SNOMED, ICD10CM = "http://loinc.org", "http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm"


# ---------------- the record ----------------

def record(size: int, now: datetime, migrated: bool = False) -> list[dict]:
    """`size` resources of patient p{size}: Patient, cancer, back pain, the red flag, and vitals. Each
    last updated at its clinical date; `migrated`: the Observations in the reverse order (a bulk load
    that wrote the oldest last), so that the `date` and `_lastUpdated` searches read different ones."""
    pid = f"p{size}"
    ago = lambda days: (now - timedelta(days=days)).isoformat()
    subject = {"reference": f"Patient/{pid}"}
    status = lambda system, code: {"coding": [{"system": system, "code": code}]}
    core = [
        {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1961-04-12"},
        {"resourceType": "Condition", "id": f"{pid}-cancer", "subject": subject, "onsetDateTime": ago(900),
         "clinicalStatus": status("http://terminology.hl7.org/CodeSystem/condition-clinical", "remission"),
         "verificationStatus": status("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"),
         "code": {"coding": [{"system": SNOMED, "code": "254837009", "display": "Malignant neoplasm of breast"}]}},
        {"resourceType": "Condition", "id": f"{pid}-back-pain", "subject": subject, "onsetDateTime": ago(10),
         "clinicalStatus": status("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
         "verificationStatus": status("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"),
         "code": {"coding": [{"system": ICD10CM, "code": "M54.50", "display": "Low back pain, unspecified"}]}},
        {"resourceType": "Observation", "id": f"{pid}-neuro", "status": "final", "code": {"text": "Clinical note"},
         "subject": subject, "effectiveDateTime": ago(1), "valueString": "New bilateral leg weakness since yesterday."},
    ]
    others = max(size - len(core), 0)
    resources = [observation(pid, i, ago(2 + 78 * i / max(others, 1))) for i in range(others)]
    resources += core  # stored last: only a newest-first search reads the red flag early
    for i, res in enumerate(resources):
        when = res.get("effectiveDateTime") or res.get("onsetDateTime") or ago(0)
        if migrated and i < others:
            when = ago(2 + 78 * (others - 1 - i) / max(others, 1))
        res["meta"] = {"versionId": "1", "lastUpdated": when}
    return resources


def observation(pid: str, i: int, when: str) -> dict:
    """An inpatient's Observations: mostly heart rates (the sieve drops them unread), every fifth a
    pain score and every tenth a nursing note (both validated and read by the rules)."""
    base = {"resourceType": "Observation", "id": f"{pid}-obs-{i}", "status": "final",
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when}
    if i % 10 == 0:
        return base | {"code": {"text": "Nursing note"},
                       "valueString": f"Review {i}: comfortable overnight, back pain settled, mobilising with one assist."}
    if i % 5 == 0:
        return base | {"code": {"coding": [{"system": LOINC, "code": "72514-3", "display": "Pain severity 0-10"}]},
                       "valueInteger": 2 + i % 5}
    return base | {"code": {"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
                   "valueQuantity": {"value": 60 + i % 40, "unit": "/min", "system": "http://unitsofmeasure.org",
                                     "code": "/min"}}


# ---------------- the FHIR stand-in (its own process) ----------------

def _dates(res: dict) -> dict[str, datetime | None]:
    """The instants `date` and `_lastUpdated` search, parsed once (every date here is ISO 8601 in UTC)."""
    clinical = res.get("effectiveDateTime")
    return {"date": datetime.fromisoformat(clinical) if clinical else None,
            "_lastUpdated": datetime.fromisoformat(res["meta"]["lastUpdated"])}


def _bound(value: str) -> datetime:
    return datetime.fromisoformat(value.removeprefix("ge").replace("Z", "+00:00"))


class StandIn:
    """Searches answered from pre-encoded entries, each distinct result list computed once."""

    def __init__(self, resources: list[dict], base: str):
        self.base = base
        # (patient reference, its dates, the encoded search entry) of each resource, by type
        self.by_type: dict[str, list[tuple[str, dict, bytes]]] = {}
        self.by_id: dict[str, bytes] = {}
        for res in resources:
            encoded = json.dumps(res, separators=(",", ":")).encode()
            entry = b'{"resource":' + encoded + b',"search":{"mode":"match"}}'
            owner = (res.get("subject") or {}).get("reference") or f"Patient/{res['id']}"
            self.by_type.setdefault(res["resourceType"], []).append((owner, _dates(res), entry))
            self.by_id[f"{res['resourceType']}/{res['id']}"] = encoded
        self.results: dict[tuple, list[bytes]] = {}

    def matches(self, rtype: str, params: dict) -> list[bytes]:
        key = (rtype, params.get("patient"), params.get("date"), params.get("_lastUpdated"), params.get("_sort"))
        if key not in self.results:
            found = [x for x in self.by_type.get(rtype, []) if x[0] == f"Patient/{params.get('patient')}"]
            for name in ("date", "_lastUpdated"):
                if name in params:
                    bound = _bound(params[name])
                    found = [x for x in found if x[1][name] is not None and x[1][name] >= bound]
            sort = params.get("_sort", "")
            if sort:
                name = sort.lstrip("-")
                found.sort(key=lambda x: x[1][name] or datetime.min.replace(tzinfo=timezone.utc),
                           reverse=sort.startswith("-"))
            self.results[key] = [x[2] for x in found]
        return self.results[key]

    def search(self, rtype: str, params: dict) -> bytes:
        found = self.matches(rtype, params)
        count, offset = int(params.get("_count", 20)), int(params.get("_offset", 0))
        link = b""
        if offset + count < len(found):
            following = urlencode({k: v for k, v in params.items() if k != "_offset"} | {"_offset": offset + count})
            link = b'{"relation":"next","url":"' + f"{self.base}/{rtype}?{following}".encode() + b'"}'
        return (b'{"resourceType":"Bundle","type":"searchset","link":[' + link + b'],"entry":['
                + b",".join(found[offset:offset + count]) + b"]}")


def serve(sizes: list[int], now: datetime, migrated: bool, port_out) -> None:
    """The stand-in's process: every size's record, on a free loopback port sent back on `port_out`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    base = f"http://127.0.0.1:{server.server_address[1]}/fhir"
    standin = StandIn([r for size in sizes for r in record(size, now, migrated)], base)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall on each

        def log_message(self, *args):
            pass

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urlsplit(self.path)
            parts = url.path.removeprefix("/fhir/").split("/")
            if len(parts) == 1:
                self.answer(200, standin.search(parts[0], dict(parse_qsl(url.query))))
            else:
                found = standin.by_id.get("/".join(parts[:2]))
                self.answer(200 if found else 404, found or b'{"resourceType":"OperationOutcome","issue":[]}')

        def do_POST(self):  # an alert's Communication (conditional create): stored nowhere, answered 201
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            self.answer(201, json.dumps(body | {"id": "c1", "meta": {"versionId": "1"}}).encode())

    server.RequestHandlerClass = Handler
    port_out.send(server.server_address[1])
    server.serve_forever()


# ---------------- one measurement (its own process) ----------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def measure_worker(size: int, base: str, redis_url: str, cap: int | None, audit_dir: str) -> dict:
    import redis

    from service.core.settings import Settings
    from service.infra.assessments import AssessmentStore
    from service.infra.audit.writer import AuditLog
    from service.infra.fhir.sync import FHIRClient
    from service.infra.queue import WorkQueue
    from workers import pipeline

    settings = Settings(environment="test", redis_url=redis_url, fhir_base_url=base, coalesce_seconds=0,
                        audit_db_url=f"sqlite:///{audit_dir}/audit-{size}.sqlite", log_level="WARNING",
                        alert_default_recipient="Practitioner/on-call",
                        # the page cap too: 200 a page (workers/pipeline/record.py PAGE_SIZE)
                        **({"record_max_resources_per_search": cap, "fhir_max_pages": -(-cap // 200)} if cap else {}))
    class Counting(FHIRClient):
        """The client, counting the distinct resources its record searches read."""
        distinct: set[str] = set()

        def search_capped(self, *args, **kwargs):
            found = super().search_capped(*args, **kwargs)
            self.distinct.update(f"{x.get('resourceType')}/{x.get('id')}" for x in found.resources)
            return found

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    fhir = Counting.from_settings(settings)
    c = pipeline.Collaborators(settings, fhir, WorkQueue(settings, r), AssessmentStore(r), AuditLog(settings), r)
    warm_up = time.perf_counter()  # a worker process loads the value sets and the language matcher once
    pipeline.evaluate_patient(c, "Patient/p10", [], {"kind": "bench"}, datetime.now(timezone.utc))
    warm_up = time.perf_counter() - warm_up
    fhir.distinct.clear()
    before = peak_rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    assessment = pipeline.evaluate_patient(c, f"Patient/p{size}", [], {"kind": "bench"}, datetime.now(timezone.utc))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"warm_up": warm_up, "wall": wall, "cpu": cpu, "rss_before": before, "peak_rss": peak_rss_mb(),
            "read": len(fhir.distinct),
            "tier": assessment.urgency, "unread": [p for p in assessment.problems if p.startswith("not every ")]}


PREFETCH_KEYS = {"conditions": "Condition", "observations": "Observation", "diagnosticReports": "DiagnosticReport",
                 "imagingStudies": "ImagingStudy", "serviceRequests": "ServiceRequest", "procedures": "Procedure",
                 "documentReferences": "DocumentReference"}


def prefetch_of(resources: list[dict]) -> dict:
    """A patient-view prefetch holding the whole record: the Patient, and a searchset for each key."""
    prefetch: dict = {key: {"resourceType": "Bundle", "type": "searchset", "entry": []} for key in PREFETCH_KEYS}
    by_type = {rtype: key for key, rtype in PREFETCH_KEYS.items()}
    for res in resources:
        if res["resourceType"] == "Patient":
            prefetch["patient"] = res
        else:
            prefetch[by_type[res["resourceType"]]]["entry"].append({"resource": res})
    return prefetch


def measure_hook(size: int) -> dict:
    import anyio

    from fhir_mappings.clinical.evaluate import assess
    from service.core.errors import PreconditionFailed
    from service.core.settings import Settings
    from service.usecases.hook import HookCall, HookServices, assess_patient

    now = datetime.now(timezone.utc)
    prefetch = prefetch_of(record(size, now))
    warm_up = time.perf_counter()
    assess(record(10, now), now)
    warm_up = time.perf_counter() - warm_up
    services = HookServices(Settings(environment="test", hook_evaluation_timeout_seconds=30, log_level="WARNING"),
                            allowed_hosts=frozenset())
    call = HookCall("spinewatch-patient-view", "patient-view", "bench", f"p{size}", prefetch=prefetch)
    before = peak_rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        assessment, _ = anyio.run(assess_patient, services, call, now)
        tier = assessment.urgency
    except PreconditionFailed:  # past the hook's evaluation budget: a 412 to the EHR
        tier = "412"
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"warm_up": warm_up, "wall": wall, "cpu": cpu, "rss_before": before, "peak_rss": peak_rss_mb(),
            "read": size,
            "tier": tier, "unread": []}


# ---------------- the run ----------------

def run_each(sizes: list[int], path: str, extra: list[str]) -> dict[int, dict]:
    results = {}
    for size in sizes:
        out = subprocess.run([sys.executable, __file__, "--measure", path, "--size", str(size), *extra],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise SystemExit(f"bench: size {size} failed:\n{out.stderr[-3000:]}")
        results[size] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def report(title: str, results: dict[int, dict]) -> None:
    reference = results.get(1_000) or next(iter(results.values()))
    per_reference = reference["wall"] / reference["read"]
    print(f"\n{title}")
    print(f"{'size':>8} {'warm s':>7} {'wall s':>8} {'cpu s':>8} {'RSS MB':>8} {'peak MB':>8} {'read':>7} "
          f"{'tier':>10} {'per-res x1000':>13}  unread")
    for size, m in results.items():
        ratio = (m["wall"] / m["read"]) / per_reference
        print(f"{size:>8} {m['warm_up']:>7.2f} {m['wall']:>8.2f} {m['cpu']:>8.2f} {m['rss_before']:>8.0f} {m['peak_rss']:>8.0f} "
              f"{m['read']:>7} {m['tier']:>10} {ratio:>13.2f}  {'; '.join(m['unread']) or '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--cap", type=int, help="SPINEWATCH_RECORD_MAX_RESOURCES_PER_SEARCH, and FHIR_MAX_PAGES to "
                                                "match (default: the settings' defaults)")
    parser.add_argument("--hook", action="store_true", help="also the CDS Hooks path, the record as a prefetch")
    parser.add_argument("--migrated", action="store_true",
                        help="Observations last updated in reverse clinical order: the two searches read different ones")
    parser.add_argument("--measure", choices=("worker", "hook"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fhir", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--audit-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure == "worker":
        print(json.dumps(measure_worker(args.size, args.fhir, args.redis, args.cap, args.audit_dir)))
        return
    if args.measure == "hook":
        print(json.dumps(measure_hook(args.size)))
        return

    from tests.support.redis_server import RedisServer

    sizes = [int(s) for s in args.sizes.split(",")]
    receive, send = multiprocessing.Pipe(duplex=False)
    served = sorted(set(sizes) | {10})  # p10 also warms each measuring process up
    standin = multiprocessing.Process(target=serve, args=(served, datetime.now(timezone.utc), args.migrated, send), daemon=True)
    standin.start()
    try:
        port = receive.recv()
        with RedisServer() as redis_server, tempfile.TemporaryDirectory() as audit_dir:
            extra = ["--fhir", f"http://127.0.0.1:{port}/fhir", "--redis", redis_server.url, "--audit-dir", audit_dir]
            report("worker path (pipeline.evaluate_patient, FHIR over HTTP, real Redis)",
                   run_each(sizes, "worker", extra + (["--cap", str(args.cap)] if args.cap else [])))
        if args.hook:
            report("hook path (usecases.hook.assess_patient, the record as a prefetch)", run_each(sizes, "hook", []))
    finally:
        standin.terminate()
        standin.join()


if __name__ == "__main__":
    main()
