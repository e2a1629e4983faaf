"""The schema of the reviewed rule, value-set and language files: a typo is an error at load.

Every file under `rules/`, `valuesets/` and `language/` is validated here before anything is compiled
(unknown keys are refused, so `phrase:` for `phrases:` cannot silently disable a rule). A failing file
raises `RuleFileError` naming the file and the field; `docs/rules.md` is generated from the same
models (scripts/rules_doc.py), so what a clinician reviews is what the service runs.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when present: 10x faster at start-up
    """Refuses a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_LOADER = _Loader


class RuleFileError(ValueError):
    """A reviewed data file that does not match its schema (the message names file and field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Review(_Strict):
    author: str
    reviewer: str
    date: date


class Source(_Strict):
    id: str
    section: str | None = None
    url: str | None = None


Version = Annotated[str, BeforeValidator(str)]  # "2.0.0", or a bare 2 written without quotes

# Code lists: code -> display name, so a reviewer reads what each code means.
CodeMap = dict[str, str]


class Codes(_Strict):
    snomed: CodeMap = Field(default_factory=dict)
    loinc: CodeMap = Field(default_factory=dict)
    cpt: CodeMap = Field(default_factory=dict)
    icd10cm_prefixes: CodeMap = Field(default_factory=dict)

    @field_validator("snomed", "loinc", "cpt", "icd10cm_prefixes", mode="before")
    @classmethod
    def _codes_are_strings(cls, value):
        if not isinstance(value, dict):
            raise ValueError("codes are a mapping of quoted code to its display name")
        bad = [k for k, display in value.items() if not isinstance(k, str) or not display]
        if bad:
            raise ValueError(f"each code is a quoted string with a display name: {bad[:3]}")
        return value

    def code_list(self, name: str) -> list[str]:
        return list(getattr(self, name))


class PainSites(Codes):
    phrases: list[str] = Field(default_factory=list)


class Score(_Strict):
    kind: Literal["rising", "sustained-severe"]
    min_readings: int | None = None
    min_rise: float | None = None
    threshold: float | None = None
    min_count: int | None = None
    min_days_apart: int | None = None


class RuleFile(_Strict):
    id: str
    version: Version
    status: Literal["stable", "test", "experimental", "deprecated"]
    box: Literal[1, 2]
    tier: Literal["emergency", "urgent"]
    title: str
    review: Review
    sources: list[Source]
    codes: Codes = Field(default_factory=Codes)
    pain_sites: PainSites | None = None
    phrases: list[str] = Field(default_factory=list)
    qualifiers: list[str] = Field(default_factory=list)
    exclude_phrases: list[str] = Field(default_factory=list)  # next to a mention, these void it
    anchor: Literal["spinal-pain"] | None = None
    yields_to: list[str] = Field(default_factory=list)  # flags whose mention already says this one
    score: Score | None = None
    recency: Literal["lookback", "history"] = "lookback"
    fixtures: list[str] = Field(default_factory=list)
    known_false_positives: list[str] = Field(default_factory=list)


class TextSpec(_Strict):
    phrases: list[str] = Field(default_factory=list)
    exclude_phrases: list[str] = Field(default_factory=list)
    overrides_codes: list[str] = Field(default_factory=list)


class PainGroups(_Strict):
    severity: Codes
    location: Codes


class ValueSetFile(_Strict):
    id: str
    version: Version
    title: str
    status: Literal["active", "draft", "retired"]
    review: Review
    sources: list[Union[str, Source]]
    include: Codes = Field(default_factory=Codes)
    exclude: Codes = Field(default_factory=Codes)
    text: TextSpec = Field(default_factory=TextSpec)
    groups: PainGroups | None = None
    known_false_positives: list[str] = Field(default_factory=list)


class LexiconClass(_Strict):
    words: list[str] | None = None
    regex: str | None = None


class LexiconFile(_Strict):
    id: Literal["lexicon"]
    version: Version
    title: str
    review: Review
    classes: dict[str, LexiconClass]


class CueSpec(_Strict):
    category: Literal["negated", "hypothetical", "other", "historical", "uncertain", "pseudo", "terminate", "current",
                      "informant"]
    direction: Literal["forward", "backward", "both"] = "forward"
    window: int = 8
    phrases: Union[list[str], dict[str, str]]


class TemplateAnswers(_Strict):
    negative: list[str]
    positive: list[str]


class ContextFile(_Strict):
    id: Literal["context"]
    version: Version
    title: str
    review: Review
    sources: list[str]
    cues: list[CueSpec]
    sections: dict[Literal["other", "hypothetical", "historical", "neutral"], list[str]]
    template_answers: TemplateAnswers
    patient_subjects: list[str]


class TerminologyRoots(_Strict):
    """The SNOMED CT concepts whose descendants, as a terminology server tells them ($subsumes),
    also belong to one local concept (a value set id or a rule id)."""

    snomed: dict[str, str]  # root code -> display
    sources: list[Source]
    excluded_by: list[str] = Field(default_factory=list)  # value sets whose `exclude` lists also apply

    @field_validator("snomed", mode="before")
    @classmethod
    def _concept_ids(cls, value):
        bad = [k for k in (value or {}) if not (isinstance(k, str) and k.isdigit() and 6 <= len(k) <= 18)]
        if bad or not value:
            raise ValueError(f"roots must be quoted SNOMED CT concept ids, got {bad[:3] or 'none'}")
        return value


class TerminologyRootsFile(_Strict):
    """valuesets/server/terminology-roots.yaml: read only when SPINEWATCH_TERMINOLOGY_URL is set."""

    id: Literal["terminology-roots"]
    version: Version
    title: str
    status: Literal["active", "draft", "retired"]
    review: Review
    sources: list[Union[str, Source]]
    concepts: dict[str, TerminologyRoots]
    known_false_positives: list[str] = Field(default_factory=list)


def load(path: Path, model: type[_Strict]):
    """Parse and validate one reviewed file; RuleFileError names the file and the failing field."""
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_LOADER)
        return model.model_validate(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RuleFileError(f"{path.name}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from exc
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise RuleFileError(f"{path.name}: {where}") from exc
