"""Measure how SpineWatch reads clinical language, side by side with medspaCy's ConText.

Three parts, each printed as counts and ratios (no timing assertions):

1. corpus: the labelled snippets of tests/fhir_mappings/clinical/corpus/snippets.yaml (format and label semantics in
   tests/fhir_mappings/clinical/corpus/README.md). Per concept (16 flags, back-pain, known-cancer): TP, FN, FP, TN,
   sensitivity and specificity, where a (concept, status) must raise as the README says and a concept
   a snippet does not list must not raise. Then the Box 2 sensitivity pooled over the 8 Box 2 flags,
   the false Box 2 raises from labels absent / hypothetical / other (with their ids), the missed Box 2
   positives, and the time per snippet. SpineWatch is `matcher.findings(text, on_spinal_pain_resource)`.
   medspaCy gets SpineWatch's own vocabulary: every match of `matcher.patterns[concept]` becomes an
   entity (overlaps resolved by spacy.util.filter_spans; a span that loses to an overlapping one takes
   the winner's context), and a concept raises when one of its spans is not negated, not
   hypothetical, not family, not historical (except known-cancer and known-bone-metastasis) and, for
   known-cancer only, not uncertain. medspaCy has no anchoring of Box 1 qualifiers to spinal pain.
2. negex: the NegEx test set (../shared/data/negex/Annotations-1-120.txt, Chapman et al.): negation
   accuracy on the target concept, Negated vs Affirmed, and the time per sentence.
3. experiencer: annotations-1-120-experiencer.txt: experiencer accuracy, Other (any non-Patient
   label) vs Patient.

The target of a NegEx sentence is the concept's occurrence in it, matched case-insensitively with any
whitespace between words, the UPPERCASED occurrence preferred; a sentence whose concept cannot be
found (the set has a few, cut at a sentence boundary) is excluded and counted. SpineWatch reads it
with `context_of(sentence, start, end)`; medspaCy with the target set as the only entity. Timing
covers the engine's call only (for medspaCy: tokenising, sentence splitting, entities and ConText;
for the corpus also the pattern matching), best of --repeat runs; SpineWatch's per-text findings
cache is cleared before each run, so the figure is the reading, not a cache hit.

How to run. medspaCy is installed only for this report, in its own venv, never as a project
dependency; SpineWatch is imported from this checkout (this script puts the repository root on
sys.path), so nothing of the project is installed in that venv:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -r bench/requirements-language.txt
    .venv-bench/bin/python bench/language.py                    # both engines, all three parts
    .venv-bench/bin/python bench/language.py --engine spinewatch --misses
    .venv-bench/bin/python bench/language.py --sections negex,experiencer --json /tmp/lang.json

With the project's own .venv (`.venv/bin/python bench/language.py`) medspaCy cannot be imported and
is skipped with one line. Exit codes: 0 done; 1 a requested engine cannot run; 2 a file is missing or
unreadable.
"""

from __future__ import annotations

import argparse
import importlib.util
import csv
import json
import re
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_CORPUS = REPO / "tests" / "fhir_mappings" / "clinical" / "corpus" / "snippets.yaml"
DEFAULT_NEGEX = SHARED_DATA / "negex"
NEGATION_FILE = "Annotations-1-120.txt"
EXPERIENCER_FILE = "annotations-1-120-experiencer.txt"
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # after site-packages and PYTHONPATH: an installed checkout still wins

SECTIONS = ("corpus", "negex", "experiencer")
MAX_LIST_LINES = 20
ENGINE_LABELS = {"spinewatch": "SpineWatch", "medspacy": "medspaCy ConText"}



def _labels():
    # By path: another package called "tests" may sit in site-packages (spaCy's dependencies ship one).
    spec = importlib.util.spec_from_file_location("corpus_labels", REPO / "tests" / "fhir_mappings" / "clinical" / "corpus" / "labels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_L = _labels()
BOX1, BOX2, CONCEPTS, HISTORY_COUNTS = _L.BOX1, _L.BOX2, _L.CONCEPTS, _L.HISTORY_COUNTS
NEVER_RAISE, STATUSES, expected_raise = _L.NEVER_RAISE, _L.STATUSES, _L.expected_raise


class Unavailable(Exception):
    """An engine cannot run here; the message is one line saying why."""


# ---------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Snippet:
    id: str
    text: str
    labels: dict[str, str]
    on_spinal_pain_resource: bool = False


@dataclass(frozen=True)
class Target:
    """One NegEx row: the concept's span in its sentence and the gold label (True: Negated / Other)."""

    row: int
    concept: str
    sentence: str
    start: int
    end: int
    gold: bool


def fail_file(message: str) -> None:
    print(f"language: {message}", file=sys.stderr)
    raise SystemExit(2)


def _yaml_items(text: str) -> tuple[list, int]:
    """The file's list items; if the whole file does not parse (being written), each item alone."""
    import yaml

    try:
        data = yaml.safe_load(text)
        return ([] if data is None else data), 0
    except yaml.YAMLError:
        pass
    items, broken = [], 0
    for chunk in re.split(r"(?m)^(?=- )", text):
        if not chunk.startswith("- "):
            continue
        try:
            part = yaml.safe_load(chunk)
        except yaml.YAMLError:
            broken += 1
            continue
        items.extend(part if isinstance(part, list) else [])
    return items, broken


def _snippet(item) -> Snippet | str:
    """A Snippet, or why the item cannot be scored."""
    if not isinstance(item, dict):
        return "not a mapping"
    sid, text, labels = item.get("id"), item.get("text"), item.get("labels")
    if not isinstance(sid, str) or not isinstance(text, str) or not isinstance(labels, dict):
        return f"{sid or '?'}: needs id, text and labels"
    unknown = sorted(c for c in labels if c not in CONCEPTS)
    bad = sorted(f"{c}={s}" for c, s in labels.items() if c in CONCEPTS and s not in STATUSES)
    if unknown or bad:
        return f"{sid}: unknown concept/status {', '.join(unknown + bad)}"
    return Snippet(sid, text, dict(labels), bool(item.get("on_spinal_pain_resource", False)))


def load_snippets(path: Path) -> tuple[list[Snippet], list[str]]:
    """The scorable snippets and one note per item left out (the file may be half-written)."""
    items, broken = _yaml_items(path.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        fail_file(f"{path} is not a YAML list of snippets")
    snippets, notes, seen = [], [], set()
    for item in items:
        s = _snippet(item)
        if isinstance(s, str):
            notes.append(s)
        elif s.id in seen:
            notes.append(f"{s.id}: duplicate id, later copy left out")
        else:
            seen.add(s.id)
            snippets.append(s)
    notes += [f"{broken} item(s) that do not parse as YAML"] if broken else []
    return snippets, notes


def target_spans(concept: str, sentence: str) -> list[tuple[int, int]]:
    """The concept's occurrences in the sentence (case-insensitive, any whitespace between words),
    only the UPPERCASED ones when there are any: the set uppercases its target."""
    words = concept.split()
    if not words:
        return []
    body = r"\s+".join(map(re.escape, words))
    found = list(re.finditer(r"(?<!\w)" + body + r"(?!\w)", sentence, re.I)) or \
        list(re.finditer(body, sentence, re.I))
    upper = [m for m in found if m.group() == m.group().upper()]
    return [(m.start(), m.end()) for m in (upper or found)]


@dataclass
class TargetSet:
    targets: list[Target]
    not_found: list[tuple[int, str, str]]  # (row, concept, sentence): the concept is not in its sentence
    ambiguous: int  # targets with more occurrences than rows: the first occurrence is scored
    labels: Counter  # gold labels as written, all rows

    @property
    def rows(self) -> int:
        return len(self.targets) + len(self.not_found)


def _targets(rows, gold_of) -> TargetSet:
    """The targets of (concept, sentence, label) rows.

    The set repeats a row once per occurrence ("CHEST PAIN that is consistent with the CHEST
    PAIN"): the k-th row of a (concept, sentence) takes its k-th occurrence. A row with fewer
    repeats than occurrences takes the first: ambiguous, and counted."""
    repeats = Counter((concept, sentence) for concept, sentence, _ in rows)
    seen: Counter = Counter()
    targets, not_found, ambiguous = [], [], 0
    for n, (concept, sentence, label) in enumerate(rows, start=1):
        spans = target_spans(concept, sentence)
        if not spans:
            not_found.append((n, concept, sentence))
            continue
        k = seen[concept, sentence]
        seen[concept, sentence] += 1
        ambiguous += repeats[concept, sentence] < len(spans)
        start, end = spans[k % len(spans)]
        targets.append(Target(n, concept, sentence, start, end, gold_of(label)))
    return TargetSet(targets, not_found, ambiguous, Counter(label for _, _, label in rows))


def load_negation(path: Path) -> TargetSet:
    """Annotations-1-120.txt: TSV with a header; sentences may be quoted (csv quoting)."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        next(reader, None)
        rows = [(r[1], r[2], r[3].strip()) for r in reader if len(r) >= 4]
    return _targets(rows, lambda label: label == "Negated")


def load_experiencer(path: Path) -> TargetSet:
    """annotations-1-120-experiencer.txt: no header; number, concept, sentence, Patient/Other."""
    with path.open(encoding="utf-8") as fh:
        rows = [(r[1], r[2], r[3].strip()) for r in (line.rstrip("\n").split("\t") for line in fh)
                if len(r) >= 4]
    return _targets(rows, lambda label: label != "Patient")


# ------------------------------------------------------------------------------------- engines


@dataclass(frozen=True)
class TargetContext:
    negated: bool
    other: bool


class SpineWatchEngine:
    name = "spinewatch"
    reads_corpus = True

    def __init__(self) -> None:
        try:  # the matcher may be half-written: any failure here is one line, not a traceback
            from fhir_mappings.clinical.terminology import load_terminology
            from fhir_mappings.clinical.terminology import context_of

            matcher = getattr(load_terminology(), "matcher", None)
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"the new matcher API is not there yet ({type(exc).__name__}: {exc})") from None
        missing = [a for a in ("findings", "mentions", "patterns") if not hasattr(matcher, a)]
        if matcher is None or missing:
            raise Unavailable("Terminology.matcher (findings, mentions, patterns) is not there yet")
        self.matcher, self._context_of = matcher, context_of

    def raised(self, s: Snippet) -> set[str]:
        return set(self.matcher.findings(s.text, on_spinal_pain_resource=s.on_spinal_pain_resource))

    def reset(self) -> None:
        """The matcher memoises whole texts: forget them before a timed run, to time the reading."""
        self.matcher.clear_caches()

    def target_context(self, text: str, start: int, end: int) -> TargetContext:
        c = self._context_of(text, start, end)
        return TargetContext(bool(c.negated), bool(c.other_experiencer))

    def explain(self, s: Snippet, concept: str) -> str:
        try:  # anchoring of Box 1 qualifiers depends on the resource, where mentions() takes it
            mentions = self.matcher.mentions(s.text, on_spinal_pain_resource=s.on_spinal_pain_resource)
        except TypeError:
            mentions = self.matcher.mentions(s.text)
        found = [f"{m.status}{'' if getattr(m, 'anchored', True) else ' unanchored'} «{m.quote}»"
                 for m in mentions if m.concept == concept]
        return "; ".join(found) or "no mention"


class MedspacyEngine:
    name = "medspacy"

    def __init__(self, patterns: dict[str, re.Pattern] | None) -> None:
        try:
            import medspacy
            from loguru import logger
            from spacy.util import filter_spans
        except ImportError as exc:
            raise Unavailable(f"cannot be imported here ({exc.name}); run with .venv-bench/bin/python "
                              "(bench/requirements-language.txt)") from None
        logger.disable("PyRuSH")  # it logs every token at DEBUG level
        nlp = medspacy.load(medspacy_enable=["medspacy_pyrush", "medspacy_context"])
        self._tokenise = nlp.make_doc
        self._before = [proc for name, proc in nlp.pipeline if name != "medspacy_context"]
        self._context = nlp.get_pipe("medspacy_context")
        self._filter_spans = filter_spans
        self.patterns = patterns
        self.reads_corpus = patterns is not None  # it needs SpineWatch's vocabulary

    def _doc(self, text: str):
        doc = self._tokenise(text)
        for proc in self._before:
            doc = proc(doc)
        return doc

    def _run(self, text: str, spans_at):
        """The doc with entities from `spans_at(doc)` after ConText; (all spans, the kept ones)."""
        doc = self._doc(text)
        spans = [s for s in spans_at(doc) if s is not None]
        kept = self._filter_spans(spans)
        doc.ents = kept
        self._context(doc)
        return spans, kept

    def target_context(self, text: str, start: int, end: int) -> TargetContext:
        _, kept = self._run(text, lambda doc: [doc.char_span(start, end, label="TARGET",
                                                            alignment_mode="expand")])
        if not kept:
            return TargetContext(False, False)
        return TargetContext(bool(kept[0]._.is_negated), bool(kept[0]._.is_family))

    def _concept_spans(self, doc):
        return [doc.char_span(m.start(), m.end(), label=concept, alignment_mode="expand")
                for concept, pattern in self.patterns.items() for m in pattern.finditer(doc.text)]

    @staticmethod
    def affirmed(concept: str, span) -> bool:
        e = span._
        if e.is_negated or e.is_hypothetical or e.is_family:
            return False
        if e.is_historical and concept not in HISTORY_COUNTS:
            return False
        return not (concept == "known-cancer" and e.is_uncertain)

    def _spans_by_concept(self, s: Snippet) -> list[tuple[str, object]]:
        """(concept, the kept span that carries its context) for every pattern match."""
        spans, kept = self._run(s.text, self._concept_spans)
        return [(span.label_, k) for span in spans for k in kept
                if k.start < span.end and span.start < k.end]

    def raised(self, s: Snippet) -> set[str]:
        return {concept for concept, k in self._spans_by_concept(s) if self.affirmed(concept, k)}

    def explain(self, s: Snippet, concept: str) -> str:
        found = []
        for c, k in self._spans_by_concept(s):
            if c == concept:
                flags = [a for a in ("negated", "hypothetical", "family", "historical", "uncertain")
                         if getattr(k._, f"is_{a}")]
                found.append(f"«{k.text}» {'+'.join(flags) or 'affirmed'}")
        return "; ".join(found) or "no pattern match"


def load_engines(names: list[str], needs_patterns: bool) -> tuple[list, bool]:
    """The engines that can run, and whether a requested one could not (printed, one line each)."""
    engines, failed, patterns = [], False, None
    if "spinewatch" in names:
        try:
            sw = SpineWatchEngine()
            engines.append(sw)
            patterns = _scored(sw.matcher.patterns)
        except Unavailable as exc:
            print(f"spinewatch: cannot run: {exc}")
            failed = True
    if "medspacy" in names:
        if needs_patterns and patterns is None:
            patterns = _patterns_without_engine()
        try:
            engines.append(MedspacyEngine(patterns))
        except Unavailable as exc:
            print(f"medspacy: skipped: {exc}")
            failed = failed or names == ["medspacy"]
    return engines, failed


def _scored(patterns: dict[str, re.Pattern]) -> dict[str, re.Pattern]:
    """The patterns of the scored concepts (the matcher also has spinal-site, mri-spine, …)."""
    return {c: patterns[c] for c in CONCEPTS if c in patterns}


def _patterns_without_engine() -> dict[str, re.Pattern] | None:
    """SpineWatch's patterns for medspaCy when the spinewatch engine is not run (or cannot be)."""
    try:
        from fhir_mappings.clinical.terminology import load_terminology

        return _scored(load_terminology().matcher.patterns)
    except Exception:  # noqa: BLE001  (the matcher is not there yet: the corpus part says so)
        return None


# ------------------------------------------------------------------------------------- scoring


@dataclass
class Counts:
    tp: int = 0
    fn: int = 0
    fp: int = 0
    tn: int = 0

    def add(self, expected: bool, got: bool) -> None:
        if expected:
            self.tp, self.fn = self.tp + got, self.fn + (not got)
        else:
            self.fp, self.tn = self.fp + got, self.tn + (not got)

    @property
    def sensitivity(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def specificity(self) -> float | None:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else None

    @property
    def accuracy(self) -> float | None:
        n = self.tp + self.fn + self.fp + self.tn
        return (self.tp + self.tn) / n if n else None

    def as_dict(self) -> dict:
        return dict(tp=self.tp, fn=self.fn, fp=self.fp, tn=self.tn, sensitivity=self.sensitivity,
                    specificity=self.specificity)


def timed(call, items: list, repeat: int, reset=None) -> tuple[list, float]:
    """Results of `call` on every item, and the best run's microseconds per item (`reset` runs,
    untimed, before each run)."""
    best = float("inf")
    results: list = []
    for _ in range(max(1, repeat)):
        if reset is not None:
            reset()
        t0 = time.perf_counter()
        results = [call(item) for item in items]
        best = min(best, time.perf_counter() - t0)
    return results, best / len(items) * 1e6 if items else 0.0


@dataclass
class CorpusScore:
    concepts: dict[str, Counts] = field(default_factory=lambda: {c: Counts() for c in CONCEPTS})
    box2: Counts = field(default_factory=Counts)
    false_raises: list[str] = field(default_factory=list)  # "id:flag", Box 2, label absent/hyp/other
    missed_box2: list[str] = field(default_factory=list)  # "id:flag"
    disagreements: list[tuple[Snippet, str, bool]] = field(default_factory=list)  # (snippet, concept, got)
    us_per_item: float = 0.0

    def as_dict(self) -> dict:
        return dict(concepts={c: n.as_dict() for c, n in self.concepts.items()},
                    box2_sensitivity=self.box2.sensitivity, box2_tp=self.box2.tp, box2_fn=self.box2.fn,
                    false_box2_raises=len(self.false_raises), false_box2_raise_ids=self.false_raises,
                    missed_box2_positives=self.missed_box2, us_per_snippet=self.us_per_item)


def score_corpus(engine, snippets: list[Snippet], repeat: int) -> CorpusScore:
    raised_sets, us = timed(engine.raised, snippets, repeat, reset=getattr(engine, "reset", None))
    score = CorpusScore(us_per_item=us)
    for s, raised in zip(snippets, raised_sets):
        for concept in CONCEPTS:
            status = s.labels.get(concept)
            expected, got = expected_raise(concept, status), concept in raised
            score.concepts[concept].add(expected, got)
            if expected != got:
                score.disagreements.append((s, concept, got))
            if concept not in BOX2:
                continue
            score.box2.add(expected, got)
            if got and status in NEVER_RAISE:
                score.false_raises.append(f"{s.id}:{concept}")
            if expected and not got:
                score.missed_box2.append(f"{s.id}:{concept}")
    return score


@dataclass
class TargetScore:
    counts: Counts
    misses: list[tuple[Target, bool]]
    us_per_item: float

    def as_dict(self) -> dict:
        c = self.counts
        return dict(accuracy=c.accuracy, correct=c.tp + c.tn, scored=c.tp + c.fn + c.fp + c.tn,
                    tp=c.tp, fn=c.fn, fp=c.fp, tn=c.tn, us_per_sentence=self.us_per_item)


def score_targets(engine, targets: list[Target], attribute: str, repeat: int) -> TargetScore:
    """`attribute` of TargetContext ('negated' or 'other') against each target's gold label."""
    contexts, us = timed(lambda t: engine.target_context(t.sentence, t.start, t.end), targets, repeat)
    counts, misses = Counts(), []
    for t, ctx in zip(targets, contexts):
        got = getattr(ctx, attribute)
        counts.add(t.gold, got)
        if got != t.gold:
            misses.append((t, got))
    return TargetScore(counts, misses, us)


# ------------------------------------------------------------------------------------ printing


def ratio(x: float | None) -> str:
    return "  —  " if x is None else f"{x:5.3f}"


def print_capped(lines: list[str], cap: int) -> None:
    for line in lines[:cap]:
        print(line)
    if len(lines) > cap:
        print(f"  … {len(lines) - cap} more")


def id_lines(label: str, ids: list[str], max_lines: int) -> list[str]:
    """`label: id, id, …` wrapped at 100 columns in at most `max_lines` lines (the last says how many
    more there are)."""
    if not ids:
        return [f"  {label}: none"]
    lines = textwrap.wrap(", ".join(ids), width=100, initial_indent=f"  {label}: ",
                          subsequent_indent=" " * (len(label) + 4), break_on_hyphens=False,
                          break_long_words=False)
    if len(lines) <= max_lines:
        return lines
    kept = lines[:max(0, max_lines - 1)]
    shown = sum(line.count(",") for line in kept)  # every kept line ends after an id's comma
    return kept + [f"  … {len(ids) - shown} more (--misses lists them all)"]


def print_corpus(path: Path, snippets: list[Snippet], notes: list[str], scores: dict[str, CorpusScore]) -> None:
    print(f"\n== corpus {path}: {len(snippets)} snippets scored, {len(notes)} left out")
    print_capped([f"  left out: {n}" for n in notes], cap=5)
    names = list(scores)
    head = "".join(f"  {ENGINE_LABELS[n]:^33}" for n in names)
    cols = "".join("    TP   FN   FP    TN  sens   spec" for _ in names)
    print(f"{'':26}{head}\n{'concept':26}{cols}")
    for concept in CONCEPTS:
        row = "".join(f"  {c.tp:4d} {c.fn:4d} {c.fp:4d} {c.tn:5d} {ratio(c.sensitivity)}  {ratio(c.specificity)}"
                      for c in (scores[n].concepts[concept] for n in names))
        print(f"{concept:26}{row}")
    for n in names:
        b = scores[n].box2
        print(f"Box 2 sensitivity, {ENGINE_LABELS[n]}: {ratio(b.sensitivity)} ({b.tp}/{b.tp + b.fn})")
    budget = max(2, MAX_LIST_LINES // len(names))  # lines per engine: at most 20 per list
    print("False Box 2 raises from labels absent/hypothetical/other (snippet:flag):")
    for n in names:
        for line in id_lines(f"{ENGINE_LABELS[n]} {len(scores[n].false_raises)}", scores[n].false_raises, budget):
            print(line)
    print("Missed Box 2 positives (snippet:flag):")
    for n in names:
        for line in id_lines(f"{ENGINE_LABELS[n]} {len(scores[n].missed_box2)}", scores[n].missed_box2, budget):
            print(line)
    times = ", ".join(f"{ENGINE_LABELS[n]} {scores[n].us_per_item:.1f} µs" for n in names)
    if len(names) == 2 and scores[names[0]].us_per_item:
        times += f" (ratio {scores[names[1]].us_per_item / scores[names[0]].us_per_item:.1f}x)"
    print(f"Time per snippet: {times}")


def print_targets(title: str, positive: str, negative: str, data: TargetSet,
                  scores: dict[str, TargetScore]) -> None:
    gold = ", ".join(f"{k} {v}" for k, v in sorted(data.labels.items()))
    print(f"\n== {title}: {data.rows} sentences ({gold}); {len(data.targets)} scored, "
          f"{len(data.not_found)} excluded (the concept is not in its sentence), "
          f"{data.ambiguous} ambiguous (several occurrences: the first is scored)")
    p, n = positive[:3], negative[:3]
    print(f"{'engine':18} {'accuracy':>8} {'correct':>11}   {p}→{p} {p}→{n} {n}→{p} {n}→{n}  µs/sentence")
    for name, s in scores.items():
        c = s.counts
        print(f"{ENGINE_LABELS[name]:18} {ratio(c.accuracy):>8} {c.tp + c.tn:5d}/{c.tp + c.fn + c.fp + c.tn:<5d}"
              f"   {c.tp:7d} {c.fn:7d} {c.fp:7d} {c.tn:7d}  {s.us_per_item:11.1f}")


def excerpt(t: Target, width: int = 90) -> str:
    left = t.sentence[max(0, t.start - width):t.start]
    right = t.sentence[t.end:t.end + width]
    return " ".join(f"{left}[[{t.sentence[t.start:t.end]}]]{right}".split())


def print_corpus_misses(engines: dict, scores: dict[str, CorpusScore]) -> None:
    for n, score in scores.items():
        print(f"\n-- corpus disagreements, {ENGINE_LABELS[n]}: {len(score.disagreements)}")
        for s, concept, got in score.disagreements:
            label = s.labels.get(concept, "not listed")
            print(f"{s.id} {concept} [{label}] {'raised' if got else 'not raised'}: "
                  f"{engines[n].explain(s, concept)} | {' '.join(s.text.split())[:200]}")


def print_target_misses(title: str, positive: str, negative: str, not_found: list,
                        scores: dict[str, TargetScore]) -> None:
    for n, score in scores.items():
        print(f"\n-- {title} disagreements, {ENGINE_LABELS[n]}: {len(score.misses)}")
        for t, got in score.misses:
            print(f"row {t.row} {t.concept!r} gold {positive if t.gold else negative}, got "
                  f"{positive if got else negative}: {excerpt(t)}")
    if not_found:
        print(f"\n-- {title}: targets not found ({len(not_found)})")
        for row, concept, sentence in not_found:
            print(f"row {row} {concept!r}: {' '.join(sentence.split())[:160]}")


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("spinewatch", "medspacy", "both"), default="both")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--negex-dir", type=Path, default=DEFAULT_NEGEX)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, of {', '.join(SECTIONS)} (default all)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--misses", action="store_true", help="list every disagreement")
    p.add_argument("--repeat", type=int, default=3, help="timing runs; the best is reported")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not args.sections or any(s not in SECTIONS for s in args.sections):
        p.error(f"--sections: choose from {', '.join(SECTIONS)}")
    return args


def check_files(args: argparse.Namespace) -> None:
    needed = ([args.corpus] if "corpus" in args.sections else []) + \
             ([args.negex_dir / NEGATION_FILE] if "negex" in args.sections else []) + \
             ([args.negex_dir / EXPERIENCER_FILE] if "experiencer" in args.sections else [])
    for path in needed:
        if not path.is_file():
            fail_file(f"missing file {path}")


def run_corpus(args, engines: list, report: dict) -> None:
    snippets, notes = load_snippets(args.corpus)
    if not snippets:
        print(f"\n== corpus {args.corpus}: no snippets to score yet ({len(notes)} left out)")
        return
    runnable = [e for e in engines if e.reads_corpus]
    for e in engines:
        if e not in runnable:
            print(f"{e.name}: corpus skipped: SpineWatch's patterns (matcher.patterns) are not there yet")
    if not runnable:
        return
    scores = {e.name: score_corpus(e, snippets, args.repeat) for e in runnable}
    print_corpus(args.corpus, snippets, notes, scores)
    if args.misses:
        print_corpus_misses({e.name: e for e in runnable}, scores)
    report["corpus"] = dict(path=str(args.corpus), snippets=len(snippets), left_out=notes,
                            engines={n: s.as_dict() for n, s in scores.items()})


def run_targets(args, engines: list, report: dict, section: str) -> None:
    if section == "negex":
        data = load_negation(args.negex_dir / NEGATION_FILE)
        title, attribute, positive, negative = "NegEx negation", "negated", "Negated", "Affirmed"
    else:
        data = load_experiencer(args.negex_dir / EXPERIENCER_FILE)
        title, attribute, positive, negative = "NegEx experiencer", "other", "Other", "Patient"
    scores = {e.name: score_targets(e, data.targets, attribute, args.repeat) for e in engines}
    print_targets(title, positive, negative, data, scores)
    if args.misses:
        print_target_misses(title, positive, negative, data.not_found, scores)
    report[section] = dict(sentences=data.rows, scored=len(data.targets), targets_not_found=len(data.not_found),
                           ambiguous_targets=data.ambiguous, gold_labels=dict(data.labels), positive=positive,
                           engines={n: s.as_dict() for n, s in scores.items()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_files(args)
    names = ["spinewatch", "medspacy"] if args.engine == "both" else [args.engine]
    engines, failed = load_engines(names, needs_patterns="corpus" in args.sections)
    report: dict = {}
    if engines:
        for section in args.sections:
            if section == "corpus":
                run_corpus(args, engines, report)
            else:
                run_targets(args, engines, report, section)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\nfigures written to {args.json}")
    return 1 if failed or not engines else 0


if __name__ == "__main__":
    sys.exit(main())
