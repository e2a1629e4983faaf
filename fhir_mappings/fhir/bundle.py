"""Read FHIR R4 input: a Bundle of any type (collection, searchset, transaction, history...), a
single resource, or NDJSON; plain, .gz or .bz2.

References inside a Bundle may point at another entry's `fullUrl` (`urn:uuid:...`, as Synthea's
transaction Bundles do). FHIR R4 Bundle 3.3.1 ("Resolving references in Bundles") says to resolve
them against the entries; `subject` and `patient` references are rewritten to `Type/id` here so that
the rest of the code only ever sees relative references.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import json
import os
import stat
import zlib
from pathlib import Path

# The most input read, uncompressed (bytes): one patient's record is far smaller; more is refused,
# not read (a gzip bomb, /dev/zero).
MAX_INPUT_BYTES = 200 * 1024 * 1024


class InputError(ValueError):
    """The input as a whole cannot be read. The message is one line and holds no patient data."""


class _TooLarge(Exception):
    pass


class _NotRegular(Exception):
    pass


class _Corrupt(Exception):
    pass


def _open_text(path: Path, max_bytes: int = MAX_INPUT_BYTES) -> str:
    """The file's text (gzip and bz2 unpacked), at most `max_bytes` of it. Only a regular file is
    read: it is opened non-blocking (a FIFO does not wait for a writer) and checked before reading."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as raw:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(mode):
            raise _NotRegular()
        magic = raw.read(3)
        raw.seek(0)
        if magic[:2] == b"\x1f\x8b":
            stream = gzip.GzipFile(fileobj=raw)
        elif magic == b"BZh":
            stream = bz2.BZ2File(raw)
        else:
            stream = raw
        try:
            data = stream.read(max_bytes + 1)
        except (EOFError, zlib.error, OSError):  # gzip.BadGzipFile, bz2 "Invalid data stream" are OSErrors
            if stream is raw:
                raise
            raise _Corrupt() from None
    if len(data) > max_bytes:
        raise _TooLarge()
    return data.decode("utf-8")


def read_path(path: str | Path, max_bytes: int = MAX_INPUT_BYTES) -> list[dict]:
    """All resources in the file at `path`, bundle entries unwrapped."""
    path = Path(path)
    try:
        text = _open_text(path, max_bytes)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a FHIR Bundle or NDJSON file") from None
    except _NotRegular:
        raise InputError(f"{path}: not a regular file (a device, FIFO or socket), expected a FHIR Bundle "
                         "or NDJSON file") from None
    except _TooLarge:
        raise InputError(f"{path}: larger than {max_bytes:,} bytes uncompressed; not read") from None
    except _Corrupt:
        raise InputError(f"{path}: a corrupt or truncated compressed file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:  # permission denied, not a directory, an I/O error
        reason = exc.strerror or str(exc) or "an I/O error"
        raise InputError(f"{path}: cannot be read ({reason[:1].lower() + reason[1:]})") from None
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
