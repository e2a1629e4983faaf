"""Read FHIR R4 input: a Bundle of any type (collection, searchset, transaction, history...), a
single resource, or NDJSON; plain, .gz or .bz2.

References inside a Bundle may point at another entry's `fullUrl` (`urn:uuid:...`, as Synthea's
transaction Bundles do). FHIR R4 Bundle 3.3.1 ("Resolving references in Bundles") says to resolve
them against the entries; `subject` and `patient` references are rewritten to `Type/id` here so that
the rest of the code only ever sees relative references.
"""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path


class InputError(ValueError):
    """The input as a whole cannot be read. The message is one line and holds no patient data."""


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:3] == b"BZh":
        raw = bz2.decompress(raw)
    return raw.decode("utf-8")


def read_path(path: str | Path) -> list[dict]:
    """All resources in the file at `path`, bundle entries unwrapped."""
    path = Path(path)
    try:
        text = _open_text(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a FHIR Bundle or NDJSON file") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({type(exc).__name__})") from None
    return resources_from_text(text, name=str(path))


def resources_from_text(text: str, name: str = "input") -> list[dict]:
    stripped = text.strip()
    if not stripped:
        raise InputError(f"{name}: empty input")
    try:
        return resources_from_json(json.loads(stripped), name)
    except json.JSONDecodeError as first_error:
        # Not one JSON document: try NDJSON, one resource per line.
        lines = [ln for ln in stripped.splitlines() if ln.strip()]
        if len(lines) < 2:
            raise InputError(f"{name}: not valid JSON (line {first_error.lineno}, column {first_error.colno})") from None
        out: list[dict] = []
        for number, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{name}: NDJSON line {number} is not valid JSON") from None
            out.extend(resources_from_json(obj, f"{name} line {number}"))
        return out


def resources_from_json(obj: object, name: str = "input") -> list[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
        raise InputError(f"{name}: not a FHIR resource (no resourceType)")
    if obj["resourceType"] != "Bundle":
        return [obj]
    entries = obj.get("entry")
    entries = [] if entries is None else entries
    if not isinstance(entries, list):
        raise InputError(f"{name}: Bundle.entry must be a list")
    resources: list[dict] = []
    full_urls: dict[str, str] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"{name}: Bundle.entry[{index}] must be an object")
        resource = entry.get("resource")
        if resource is None:  # history entries for deletes, or request-only entries
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InputError(f"{name}: Bundle.entry[{index}].resource has no resourceType")
        if resource["resourceType"] == "Bundle":  # e.g. a document or message nested in a collection
            resources.extend(resources_from_json(resource, f"{name} entry[{index}]"))
            continue
        if entry.get("fullUrl") and resource.get("id"):
            full_urls[entry["fullUrl"]] = f"{resource['resourceType']}/{resource['id']}"
        resources.append(resource)
    if full_urls:
        for resource in resources:
            for key in ("subject", "patient"):
                ref = resource.get(key)
                if isinstance(ref, dict) and ref.get("reference") in full_urls:
                    resource[key] = {**ref, "reference": full_urls[ref["reference"]]}
            for attachment in attachments(resource):  # a note's Binary named by its fullUrl
                if attachment.get("url") in full_urls:
                    attachment["url"] = full_urls[attachment["url"]]
    return resources


def attachments(resource: dict) -> list[dict]:
    """The attachments a note or report carries its text in (DocumentReference.content,
    DiagnosticReport.presentedForm), as raw JSON."""
    if resource.get("resourceType") == "DocumentReference":
        found = [c.get("attachment") for c in resource.get("content") or [] if isinstance(c, dict)]
    elif resource.get("resourceType") == "DiagnosticReport":
        found = resource.get("presentedForm") or []
    else:
        return []
    return [a for a in found if isinstance(a, dict)]


def binary_key(url: object) -> str | None:
    """`Binary/id` for a relative or absolute reference to a Binary, else None."""
    if not isinstance(url, str):
        return None
    marker = url.rfind("Binary/")
    if marker < 0 or (marker > 0 and url[marker - 1] != "/"):
        return None
    return url[marker:].split("/_history")[0]


def patient_key(resource: dict) -> str | None:
    """The `Patient/id` a resource is about, or None when it names none."""
    if resource.get("resourceType") == "Patient":
        return f"Patient/{resource['id']}" if resource.get("id") else None
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            reference = ref["reference"]
            marker = reference.rfind("Patient/")
            if marker >= 0:
                return reference[marker:].split("/_history")[0]
    return None


def split_by_patient(resources: list[dict]) -> dict[str | None, list[dict]]:
    """Group resources by the patient they are about (None: about no one in particular)."""
    groups: dict[str | None, list[dict]] = {}
    binaries = {f"Binary/{r.get('id')}": r for r in resources if r.get("resourceType") == "Binary"}
    for resource in resources:
        groups.setdefault(patient_key(resource), []).append(resource)
    if binaries:  # a Binary names no patient: it goes with the notes that point at it
        for key, group in groups.items():
            if key is None:
                continue
            wanted = {binary_key(a.get("url")) for r in group for a in attachments(r)}
            group.extend(binaries[k] for k in sorted(wanted & binaries.keys()))
    return groups
