"""Which Binary resources a patient's notes point at, and which of them may be fetched.

A clinical note (DocumentReference.content.attachment, R4) or a report's presentedForm
(DiagnosticReport.presentedForm) carries its text inline (`data`, base64) or names it by `url`. The
pure core reads a `url` only when the Binary it names is in the record (fhir_mappings: "relative
`Binary/<id>` or an absolute URL ending `/Binary/<id>`"); the worker and the CDS Hooks fallback fetch
those Binaries here first, within limits:

- only on the same FHIR server: `Binary/<id>` relative to its base, or an absolute URL with the
  base's origin (scheme, host, port) ending `/Binary/<id>` (optionally `/_history/<v>`). Anything
  else (another host, a non-FHIR document URL, urn:, contained `#x`) is never fetched: the token
  would go elsewhere (SSRF), and the core names the note in `problems` as not read;
- only what the core can read (text, Markdown, HTML; no declared contentType counts as text):
  a PDF or an image is not downloaded just to be reported unreadable;
- newest notes first, at most `limit` reads per evaluation; the rest stay unread (and named);
- each answer at most SPINEWATCH_NOTE_MAX_BYTES (checked by the callers' clients, by Content-Length
  and while reading).

Nothing here logs or returns note text.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fhir_mappings.fhir.bundle import attachments
from service.infra.fhir.base import origin

# Attachment media types the core reads (fhir_mappings notes: text, Markdown, HTML / XHTML).
READABLE_MEDIA = frozenset({"text/plain", "text/markdown", "text/x-markdown", "text/html", "application/xhtml+xml"})
_ID = r"[A-Za-z0-9\-.]{1,64}"  # FHIR R4 id: also keeps the path inside the FHIR base
_RELATIVE = re.compile(rf"^Binary/({_ID})(?:/_history/({_ID}))?$")
_ABSOLUTE_TAIL = re.compile(rf"/Binary/({_ID})(?:/_history/({_ID}))?$")
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")


def binary_target(url: object, base_url: str) -> tuple[str, str] | None:
    """(what to GET, `Binary/<id>`) when `url` names a Binary on the FHIR server at `base_url`;
    None otherwise. Relative references are read relative to the base; an absolute one is read as
    given (same origin: the token stays with the server it was issued for)."""
    if not isinstance(url, str) or not url:
        return None
    found = _RELATIVE.match(url)
    if found:
        return url, f"Binary/{found.group(1)}"
    if "?" in url or "#" in url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.username or parts.password:
        return None
    here = origin(url)
    if here is None or here != origin(base_url):
        return None
    found = _ABSOLUTE_TAIL.search(parts.path)
    if not found:
        return None
    return url, f"Binary/{found.group(1)}"


def key_of(target: str) -> str:
    """`Binary/<id>` of a GET target made by binary_target."""
    found = _ABSOLUTE_TAIL.search("/" + target.lstrip("/"))
    if not found:
        raise ValueError("not a Binary target")
    return f"Binary/{found.group(1)}"


def _readable(attachment: dict) -> bool:
    content_type = attachment.get("contentType")
    if not isinstance(content_type, str) or not content_type.strip():
        return True  # R4 Attachment.contentType is optional; the Binary's own contentType decides
    return content_type.split(";", 1)[0].strip().lower() in READABLE_MEDIA


def _date(resource: dict) -> str:
    """The clinical date to order notes by, newest first (ISO strings compare well enough here)."""
    if resource.get("resourceType") == "DocumentReference":
        period = (resource.get("context") or {}).get("period") or {}
        candidates = [resource.get("date"), period.get("end"), period.get("start")]
    else:
        candidates = [resource.get("issued"), resource.get("effectiveDateTime"),
                      (resource.get("effectivePeriod") or {}).get("end")]
    candidates += [(resource.get("meta") or {}).get("lastUpdated")]
    return max((c for c in candidates if isinstance(c, str)), default="")


@dataclass
class BinaryPlan:
    """What to fetch (GET targets, newest note first) and what was left unread, counted."""

    fetch: list[tuple[str, str]] = field(default_factory=list)  # (GET target, "Binary/<id>")
    over_cap: int = 0  # same-server Binaries beyond the read limit
    elsewhere: int = 0  # URLs not on the FHIR server: never fetched


def plan_binaries(resources: list[dict], base_url: str, limit: int) -> BinaryPlan:
    """The Binaries the record's notes and reports name by `url`, not already in the record."""
    have = {f"Binary/{r.get('id')}" for r in resources if r.get("resourceType") == "Binary" and r.get("id")}
    plan = BinaryPlan()
    wanted: dict[str, str] = {}
    notes = [r for r in resources if r.get("resourceType") in ("DocumentReference", "DiagnosticReport")]
    # Notes before reports, each newest first: the cap keeps the notes most likely to matter.
    notes.sort(key=lambda r: (r.get("resourceType") == "DocumentReference", _date(r)), reverse=True)
    for note in notes:
        for attachment in attachments(note):
            if attachment.get("data") is not None or attachment.get("url") is None or not _readable(attachment):
                continue
            target = binary_target(attachment.get("url"), base_url)
            if target is None:
                plan.elsewhere += 1
                continue
            get, key = target
            if key in have or key in wanted:
                continue
            wanted[key] = get
    for index, (key, get) in enumerate(wanted.items()):
        if index < limit:
            plan.fetch.append((get, key))
        else:
            plan.over_cap += 1
    return plan


def referenced_binaries(resources: list[dict]) -> set[str]:
    """`Binary/<id>` of every Binary the resources' attachments name (as the core matches them)."""
    keys = set()
    for resource in resources:
        for attachment in attachments(resource):
            url = attachment.get("url")
            if not isinstance(url, str):
                continue
            marker = url.rfind("Binary/")
            if marker < 0 or (marker > 0 and url[marker - 1] != "/"):
                continue
            found = re.match(rf"Binary/({_ID})", url[marker:])
            if found:
                keys.add(f"Binary/{found.group(1)}")
    return keys


class NotABinary(ValueError):
    """The answer is neither a FHIR Binary nor raw content. No content in the message."""


def binary_resource(content_type: str | None, body: bytes, key: str) -> dict:
    """A Binary resource from the answer to GET Binary/<id>: the FHIR JSON form (R4 Binary with
    base64 `data`, what `Accept: application/fhir+json` asks for), or the raw content some servers
    return whatever is asked (R4 Binary §"Serving Binary Resources using the RESTful API"), wrapped."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in _JSON_TYPES or (not media and body.lstrip()[:1] == b"{"):
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise NotABinary("the answer is not JSON") from None
        if not isinstance(document, dict) or document.get("resourceType") != "Binary":
            raise NotABinary("the answer is not a Binary resource")
        return document
    if not media:
        raise NotABinary("the answer has no Content-Type")
    return {"resourceType": "Binary", "id": key.split("/", 1)[1], "contentType": content_type,
            "data": base64.b64encode(body).decode("ascii")}
