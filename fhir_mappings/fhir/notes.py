"""Clinical notes as text: the attachments of DocumentReference (US Core clinical notes) and
DiagnosticReport.presentedForm, inline (base64 `data`) or by reference to a Binary in the record.

Pure: the caller (worker, hook, CLI) has already read any Binary the note points at; one it could not
read is simply absent, and the note is then named in `problems`. Plain text and Markdown are read as
they are, HTML and XHTML with their tags stripped and their block structure kept as line breaks (so
headings, list items and "Label: value" rows stay sentences of their own). Other formats (PDF, RTF,
images) cannot be read and are named, never silently ignored. `charset` is honoured (default UTF-8;
undecodable bytes are replaced, not fatal).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from fhir_mappings.fhir.bundle import binary_key

_PLAIN = {"text/plain", "text/markdown", "text/x-markdown"}
_HTML = {"text/html", "application/xhtml+xml"}
_BLOCK = {"p", "br", "div", "li", "ul", "ol", "tr", "td", "th", "table", "h1", "h2", "h3", "h4", "h5", "h6",
          "section", "article", "header", "footer", "pre", "blockquote", "dt", "dd", "hr"}
_SKIP = {"script", "style", "head", "title"}
# Paragraph-level blocks end a list's lead-in ("if she develops any of the following:"); items do not.
_PARAGRAPH_MARK = "\u2029"  # Unicode paragraph separator, until the text is laid out
_PARAGRAPH = {"p", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "hr"}


@dataclass(frozen=True)
class NoteText:
    text: str | None  # the note's text, None when it cannot be read
    problem: str | None = None  # why not, or that it was cut (no note text, no patient data)


class _TextOfHtml(HTMLParser):
    """Text of an HTML note: tags out, entities decoded, blocks on lines of their own."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self._skipping += 1
        elif tag == "li":
            self.parts.append("\n• ")  # an item of its own: never joined to the line above
        elif tag in _BLOCK:
            self.parts.append(_PARAGRAPH_MARK if tag in _PARAGRAPH else "\n")

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in _BLOCK:
            self.parts.append(_PARAGRAPH_MARK if tag in _PARAGRAPH else "\n")

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


def html_text(markup: str) -> str:
    parser = _TextOfHtml()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r"[ \n]*\u2029[ \n\u2029]*", "\u2029", text)  # a paragraph wins over the line breaks around it
    text = re.sub(r" *\n[ \n]*", "\n", text)
    return text.replace("\u2029", "\n\n").strip()


def _media(content_type: object) -> tuple[str, str]:
    """(media type, charset) of a contentType such as "text/plain; charset=ISO-8859-1"."""
    if not isinstance(content_type, str) or not content_type.strip():
        return "text/plain", "utf-8"  # R4 Attachment.contentType is optional; notes are text
    parts = [p.strip() for p in content_type.split(";")]
    charset = next((p.split("=", 1)[1].strip(" \"'") for p in parts[1:] if p.lower().startswith("charset=")), "utf-8")
    return parts[0].lower(), charset or "utf-8"


def _decode(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name: read it as UTF-8 rather than lose the note
        return data.decode("utf-8", errors="replace")


def attachment_text(attachment: dict, binaries: dict[str, dict], max_chars: int) -> NoteText:
    """The readable text of one attachment (raw JSON), with `binaries` the record's Binary
    resources by `Binary/id`."""
    content_type = attachment.get("contentType")
    raw = attachment.get("data")
    where = "its attachment"
    if raw is None and attachment.get("url") is not None:
        if content_type and _media(content_type)[0] not in _PLAIN | _HTML:
            return NoteText(None, f"note in {_media(content_type)[0]} cannot be read (text, Markdown and HTML only)")
        key = binary_key(attachment.get("url"))
        binary = binaries.get(key) if key else None
        if binary is None:
            return NoteText(None, "note content at a URL that was not read (another server, over the size or "
                                  "count cap, or not found)")
        raw, content_type, where = binary.get("data"), binary.get("contentType") or content_type, key
    if raw is None:
        return NoteText(None, "note without content")
    media, charset = _media(content_type)
    if media not in _PLAIN | _HTML:
        return NoteText(None, f"note in {media} cannot be read (text, Markdown and HTML only)")
    try:
        data = base64.b64decode(raw, validate=False) if isinstance(raw, str) else bytes(raw)
    except (binascii.Error, ValueError, TypeError):
        return NoteText(None, f"note content of {where} is not valid base64")
    text = _decode(data, charset)
    if media in _HTML:
        text = html_text(text)
    if len(text) > max_chars:
        return NoteText(text[:max_chars], f"note longer than {max_chars} characters: the first {max_chars} were read")
    return NoteText(text)
