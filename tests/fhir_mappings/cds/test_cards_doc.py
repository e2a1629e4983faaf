"""docs/cards.md shows every current card type: scripts/render_cards.py's pictures are of the cards
the code makes today (a digest per card in docs/cards/manifest.json), and the page shows each."""

import json
from pathlib import Path

from scripts.card_gallery import gallery
from scripts.render_cards import card_html, manifest
from tests.support.paths import ROOT



def test_the_pictures_are_of_the_current_cards():
    stored = json.loads((ROOT / "docs/cards/manifest.json").read_text())
    assert stored == manifest(), "the cards changed: run .venv/bin/python scripts/render_cards.py"


def test_the_page_shows_every_card_type():
    doc = (ROOT / "docs/cards.md").read_text()
    for name, _, _ in gallery():
        assert f"(cards/{name}.png)" in doc
        assert (ROOT / "docs/cards" / f"{name}.png").stat().st_size > 1000


def test_the_rendering_is_the_sandbox_s_layout():
    for _, hook, card in gallery():
        page = card_html(hook, card)
        assert card["summary"] in page.replace("&#x27;", "'") and "Dismiss" in page
        assert "<strong>" in page and "<ul>" in page  # the detail is Markdown rendered to HTML
        for suggestion in card.get("suggestions", []):
            assert suggestion["label"] in page
