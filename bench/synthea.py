"""Benchmark one large Synthea patient through the pure evaluation core, in CPU time.

The default patient (../shared/data/synthea, MANIFEST.tsv) has 3,419 resources, 45 of them
ImagingStudies listing 17,961 DICOM instances: the record that showed validation to be most of an
evaluation's time. Prints, in CPU seconds (time.process_time, this process only):

- cold: the first `assess` in a fresh process (vocabulary compiled first, not counted), without and
  with `warm_models()` at start-up, best of --processes fresh processes each;
- warm: `assess` in a process that has evaluated before, best and median of --repeat runs, the
  per-text caches cleared before each (a worker meets a new patient each time; aim <= 0.5 s);
- per resource type: how many, how many the sieve keeps for validation, and `read_record` over
  that type alone (plus the Patient);
- the ratio of decoding plus assessing to a bare `json.loads` of the same file.

    python bench/synthea.py [--file PATH] [--repeat 5] [--processes 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing it

from fhir_mappings.clinical.evaluate import assess  # noqa: E402
from fhir_mappings.clinical.extract import read_record, warm_models  # noqa: E402
from fhir_mappings.clinical.sieve import _text_is_relevant, is_relevant  # noqa: E402
from fhir_mappings.clinical.terminology import load_terminology  # noqa: E402
from fhir_mappings.fhir.bundle import _open_text, resources_from_text  # noqa: E402

DEFAULT_FILE = (ROOT.parent / "shared" / "data" / "synthea" / "samply__blaze__test-data_synthea" /
                "e5a8d3f4-4484-ebfd-7404-d9f02c9fe6a6.json.bz2")
NOW = datetime(2026, 11, 25, tzinfo=timezone.utc)


def forget_texts(term) -> None:
    """Clear the per-text caches: time the reading of a new patient, not the memory of the last."""
    term.matcher.clear_caches()
    _text_is_relevant.cache_clear()


def cpu(fn) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def first_assess(path: Path, warm: bool) -> float:
    """In this (fresh) process: the CPU time of the first assess of the file."""
    term = load_terminology()
    if warm:
        warm_models()
    resources = resources_from_text(_open_text(path))
    return cpu(lambda: assess(resources, NOW, terminology=term))


def cold(path: Path, warm: bool, processes: int) -> float:
    flags = ["--first-assess"] + (["--warm-models"] if warm else [])
    runs = [float(subprocess.run([sys.executable, __file__, "--file", str(path), *flags], check=True,
                                 capture_output=True, text=True).stdout) for _ in range(processes)]
    return min(runs)


def per_type(resources: list[dict], term) -> None:
    patient = [r for r in resources if r.get("resourceType") == "Patient"]
    counts = Counter(r.get("resourceType") for r in resources)
    print(f"{'resource type':<26}{'count':>7}{'kept':>7}{'read_record CPU':>18}")
    for rtype, count in counts.most_common():
        group = [r for r in resources if r.get("resourceType") == rtype]
        kept = sum(1 for r in group if is_relevant(r, term))
        forget_texts(term)
        seconds = cpu(lambda: read_record(group if rtype == "Patient" else patient + group, term))
        print(f"{rtype:<26}{count:>7}{kept:>7}{seconds:>16.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--repeat", type=int, default=5, help="warm runs; best and median reported")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per cold figure; best reported")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one warm run")
    parser.add_argument("--first-assess", action="store_true", help=argparse.SUPPRESS)  # a cold run's child
    parser.add_argument("--warm-models", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.file.is_file():
        raise SystemExit(f"bench: {args.file} not found (the shared Synthea data, or pass --file)")
    if args.first_assess:
        print(first_assess(args.file, args.warm_models))
        return

    text = _open_text(args.file)
    resources = resources_from_text(text)
    kinds = Counter(r.get("resourceType") for r in resources)
    print(f"{args.file.name}: {len(resources)} resources, {kinds['ImagingStudy']} ImagingStudies, "
          f"{len(text) / 1e6:.1f} MB of JSON")
    print(f"cold, first assess in a fresh process:      {cold(args.file, False, args.processes):.3f} s CPU")
    print(f"cold, after warm_models() at start-up:      {cold(args.file, True, args.processes):.3f} s CPU")

    term = load_terminology()
    warm_models()
    assess(resources, NOW, terminology=term)
    runs = []
    for _ in range(args.repeat):
        forget_texts(term)
        runs.append(cpu(lambda: assess(resources, NOW, terminology=term)))
    print(f"warm assess: best {min(runs):.3f} s, median {statistics.median(runs):.3f} s CPU  (aim <= 0.5 s)")

    baseline = min(cpu(lambda: json.loads(text)) for _ in range(args.repeat))
    forget_texts(term)
    pipeline = cpu(lambda: assess(resources_from_text(text), NOW, terminology=term))
    print(f"json.loads {baseline:.3f} s; decode + assess {pipeline:.3f} s: {pipeline / baseline:.2f}x")
    per_type(resources, term)

    if args.profile:
        forget_texts(term)
        profile = cProfile.Profile()
        profile.runcall(assess, resources, NOW, terminology=term)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
