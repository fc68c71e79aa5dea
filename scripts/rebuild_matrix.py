"""The rebuild workflow's matrix: recipes/ as a JSON list for GitHub Actions' `fromJSON`.

The rule (also `sdxl-convert rebuild --all`'s): a recipe is rebuilt on schedule when it has a
`publish:` section, i.e. somewhere to publish to. The tiny and bench recipes have none (they are
tests and measurements), so they never enter the matrix. Needs only PyYAML, so the listing job
does not install the converter. Names given on the command line (a manual dispatch) narrow the
list; an unknown or unpublishable name is an error, not a silent no-op.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def publishable(folder: Path) -> list[str]:
    names = []
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("publish"), dict):
            names.append(path.stem)
    return names


def main(argv: list[str]) -> int:
    names = publishable(RECIPES)
    wanted = [a for arg in argv for a in arg.split()]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        print(f"not rebuildable (no such recipe, or no publish: section): {', '.join(unknown)}", file=sys.stderr)
        return 2
    print(f"recipes={json.dumps(wanted or names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
