"""Write fhir_mappings/clinical/language/protected-words.txt: real words the spelling tolerance must never
"correct" ("presents" is not "prevents"), taken from the public NegEx test set (2,376 sentences from
120 de-identified clinical reports; chapmanbe/negex, Apache-2.0; ../shared/data/negex).

    .venv/bin/python scripts/protected_words.py [--negex DIR]

Words of six letters or more, lower-cased, as they stand in those sentences. The speller corrects a
word only when it is none of these and one edit from the clinical vocabulary (fhir_mappings/clinical/text.py).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fhir_mappings" / "clinical" / "language" / "protected-words.txt"
NEGEX = ROOT.parent / "shared" / "data" / "negex"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--negex", type=Path, default=NEGEX)
    args = parser.parse_args()
    files = sorted(args.negex.glob("*.txt"))
    if not files:
        raise SystemExit(f"protected_words: no NegEx files under {args.negex}")
    words = set()
    for path in files:
        words |= {w.lower() for w in re.findall(r"[A-Za-z]{6,}", path.read_text(encoding="utf-8", errors="replace"))}
    header = ("# Real words the speller never corrects (scripts/protected_words.py; from the public NegEx test set,\n"
              "# chapmanbe/negex, Apache-2.0). One a line.\n")
    OUT.write_text(header + "\n".join(sorted(words)) + "\n", encoding="utf-8")
    print(f"wrote {len(words)} words to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
