"""Render every SpineWatch card type as the CDS Hooks Sandbox shows it, for docs/cards.md.

    .venv/bin/python scripts/render_cards.py          # docs/cards/*.png, docs/cards/manifest.json, docs/cards.md

The cards come from scripts/card_gallery.py (the real card code on demo records). Each is laid out
as the sandbox lays a card out (github.com/cds-hooks/sandbox, its card list): the summary, the detail
rendered as Markdown to HTML, the indicator as the colour of the card's edge, the source, the
suggestions and links as buttons, and "Dismiss" with the override reasons (the card has a uuid).
Headless Chromium (/usr/bin/chromium) takes the pictures. manifest.json holds a digest of each
card; tests/fhir_mappings/cds/test_cards_doc.py fails when the cards change and the pictures were not redone.
"""

from __future__ import annotations

import hashlib
import html
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from markdown_it import MarkdownIt  # noqa: E402  (CommonMark, as the sandbox's GitHub Markdown)

from scripts.card_gallery import gallery  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "cards"
DOC = ROOT / "docs" / "cards.md"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
COLOUR = {"critical": "#d9534f", "warning": "#f0ad4e", "info": "#5bc0de"}  # the sandbox's indicator colours
WIDTH = 820
TITLES = {
    "patient-view-emergency": "patient-view, emergency (MSCC coordinator configured)",
    "patient-view-emergency-no-coordinator": "patient-view, emergency (no coordinator configured: the generic line)",
    "patient-view-urgent": "patient-view, urgent",
    "patient-view-routine": "patient-view, routine",
    "order-sign-xray-emergency": "order-select / order-sign, spine X-ray for an emergency patient",
    "order-sign-xray-urgent": "order-select / order-sign, spine X-ray for an urgent patient",
    "order-sign-xray-routine": "order-select / order-sign, spine X-ray for a routine patient",
}

CSS = """
body { font-family: "Helvetica Neue", Helvetica, Arial, sans-serif; font-size: 14px; color: #333; margin: 16px;
       background: #f5f5f5; width: %dpx; }
.card { background: #fff; border: 1px solid #ddd; border-left: 8px solid var(--edge); border-radius: 4px;
        padding: 12px 16px; box-shadow: 0 1px 2px rgba(0,0,0,.1); }
.summary { font-size: 17px; font-weight: bold; margin-bottom: 8px; }
.detail p { margin: 6px 0; line-height: 1.4; } .detail ul { margin: 4px 0 6px 20px; padding: 0; }
.detail li { margin: 2px 0; line-height: 1.35; }
.source { color: #777; font-size: 12px; margin: 8px 0; }
.buttons { margin-top: 10px; } .btn { display: inline-block; border: 1px solid #337ab7; color: #337ab7;
  background: #fff; border-radius: 3px; padding: 5px 10px; margin: 0 6px 6px 0; font-size: 13px; }
.btn.primary { background: #337ab7; color: #fff; } .btn.dismiss { border-color: #999; color: #555; float: right; }
.reasons { color: #777; font-size: 12px; clear: both; }
.hook { color: #999; font-size: 12px; margin-bottom: 6px; }
""" % WIDTH


def card_html(hook: str, card: dict) -> str:
    detail = MarkdownIt("commonmark").render(card["detail"])
    buttons = "".join(f'<span class="btn primary">{html.escape(s["label"])}</span>'
                      for s in card.get("suggestions", []))
    buttons += "".join(f'<span class="btn">{html.escape(link["label"])}</span>' for link in card.get("links", []))
    buttons += '<span class="btn dismiss">Dismiss</span>'
    reasons = ", ".join(html.escape(r["display"]) for r in card.get("overrideReasons", []))
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>{CSS}</style></head><body>
<div class="hook">{html.escape(hook)}</div>
<div class="card" style="--edge: {COLOUR[card['indicator']]}">
<div class="summary">{html.escape(card['summary'])}</div>
<div class="detail">{detail}</div>
<div class="source">Source: {html.escape(card['source']['label'])}</div>
<div class="buttons">{buttons}</div>
<div class="reasons">Dismiss reasons: {reasons}</div>
</div></body></html>"""


def digest(card: dict) -> str:
    return hashlib.sha256(json.dumps(card, sort_keys=True).encode()).hexdigest()


def manifest() -> dict[str, str]:
    return {name: digest(card) for name, _, card in gallery()}


def _height(card: dict) -> int:
    chars = len(card["detail"]) + 120 * card["detail"].count("\n- ")
    return 260 + 20 * (chars // 95 + card["detail"].count("\n\n") + 1)


def render() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, hook, card in gallery():
            page = Path(tmp) / f"{name}.html"
            page.write_text(card_html(hook, card))
            png = OUT / f"{name}.png"
            subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp}/profile", f"--screenshot={png}",
                            f"--window-size={WIDTH + 40},{_height(card)}", page.as_uri()],
                           check=True, capture_output=True, timeout=120)
            sections.append(f"## {TITLES.get(name, name)}\n\n`{card['indicator']}` · summary "
                            f"{len(card['summary'])} characters\n\n![{name}](cards/{name}.png)\n")
    (OUT / "manifest.json").write_text(json.dumps(manifest(), indent=2, sort_keys=True) + "\n")
    DOC.write_text(HEADER + "\n".join(sections))


HEADER = """# What the cards look like

Every card type SpineWatch answers, as the CDS Hooks Sandbox renders it (detail as Markdown, the
indicator as the colour of the edge, suggestions and links as buttons, Dismiss with the override
reasons), for clinical sign-off. The cards are built by the real card code (`fhir_mappings/cds/cards.py`)
from the demo records in `scripts/card_gallery.py`, evaluated at 2026-12-01 09:00 UTC. Regenerate
with `.venv/bin/python scripts/render_cards.py` (headless Chromium); `tests/fhir_mappings/cds/test_cards_doc.py`
fails when the cards change and these pictures were not redone.

What each card must say (tests/fhir_mappings/cds/test_cards.py): first what to do and by when; emergency: MRI
within 24 h, call the MSCC coordinator (from `SPINEWATCH_MSCC_COORDINATOR_*`, or a generic line),
what to do meanwhile (NG234); urgent: MRI within 1 week, ask about and document neurology,
safety-netting, what would make it an emergency; routine: MRI not X-ray, safety-netting; then at
most three findings (what, where, when) and the cancer; "Why not X-ray" only where an X-ray is
ordered, pending or recent; NICE linked once; no resource ids in the prose; summary under 140
characters; at most 600 characters before the findings.

## Full evidence link

A card shows at most three findings. When `SPINEWATCH_PUBLIC_BASE_URL` is set, each card also gets
one more link, "Full evidence (N findings)", a CDS Hooks 2.0 Link of type `absolute`
(https://cds-hooks.hl7.org/2.0/#link). It opens a page with every finding of the assessment in the
same clinical words as the card (what was found, where it was written, when), the flags raised, the
tier and what to do, and the card's notes (an X-ray, entries that could not be read). The page is a
copy made when the card was shown; resource ids are not in it.

The URL is a capability: anyone holding it can read the page until it expires, with no other
login (an EHR opens a card's link as it is). So the token is 192 random bits, the link lives only
`SPINEWATCH_EVIDENCE_LINK_TTL_SECONDS` (default one day), it is never logged, and the page is sent
`Cache-Control: no-store`, `Referrer-Policy: no-referrer`, `X-Robots-Tag: noindex`, with a strict
Content-Security-Policy (nothing but its own style; framed only by this origin). An unknown or
expired link answers 404 and says to reopen the patient's record. Each page served is audited
(`evidence-view`). Pages are kept in memory per process, or in Redis for several processes
(`SPINEWATCH_EVIDENCE_LINK_REDIS_URL`); if they cannot be stored, the card is served without the
link. Sites that cannot accept a link readable by whoever holds it set
`SPINEWATCH_EVIDENCE_LINKS=false`. The pictures below are of cards without this link.

"""


if __name__ == "__main__":
    render()
    print(f"wrote {DOC.relative_to(ROOT)} and {len(manifest())} pictures in {OUT.relative_to(ROOT)}")
