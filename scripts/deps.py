"""Install helper for the justfile: dependency lists from pyproject.toml and a post-install check.

Kept in one place so pyproject.toml stays the single list of dependencies.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def requirements(exclude: set[str], extras: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return [r for r in reqs if _name(r) not in exclude]


def _name(requirement: str) -> str:
    for sep in "=<>!~;[ ":
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip().lower().replace("_", "-")


def check() -> list[str]:
    """The install is right only if torch is the CPU build and torchvision is absent."""
    problems = []
    torch_version = importlib.metadata.version("torch")
    if not torch_version.startswith("2.13.0") or "+cpu" not in torch_version:
        problems.append(f"torch {torch_version} installed; expected the CPU wheel 2.13.0+cpu")
    if importlib.util.find_spec("torchvision") is not None:
        problems.append("torchvision is installed; it breaks `import optimum.intel` beside CPU torch (pip uninstall torchvision)")
    for name in ("optimum-intel", "openvino", "nncf", "diffusers"):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exclude", action="append", default=[])
    parser.add_argument("--extra", action="append", default=[])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        problems = check()
        for p in problems:
            print(f"install check: {p}", file=sys.stderr)
        return 1 if problems else 0
    print(" ".join(requirements({e.lower() for e in args.exclude}, args.extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
