"""Where a build reads and writes; passed explicitly so no stage depends on the cwd or globals."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workspace:
    """Folders of one build.

    `artifacts` holds bundles (`<recipe>/<build-id>/`), failed builds (`broken/`) and
    generated sources (`sources/`); `hf_cache` is the Hugging Face cache (None: the
    client's default, which honours HF_HOME / HF_HUB_CACHE).
    """

    artifacts: Path
    hf_cache: Path | None = None
    cache: Path | None = None  # the component cache; None: $SDXL_CONVERT_CACHE, else <artifacts>/cache

    @property
    def component_cache(self) -> Path:
        from convert.component_cache import cache_dir

        return cache_dir(self.cache, self.artifacts)

    @property
    def generated_sources(self) -> Path:
        return self.artifacts / "sources"

    @property
    def broken(self) -> Path:
        return self.artifacts / "broken"

    @property
    def staging(self) -> Path:
        return self.artifacts / ".staging"

    def log_file(self, recipe_name: str, stage: str = "build") -> Path:
        """Converter output of the latest build of a recipe (kept: it explains failures)."""
        return self.artifacts / "logs" / f"{recipe_name}.{stage}.log"

    def bundle_dir(self, recipe_name: str, build_id: str) -> Path:
        return self.artifacts / recipe_name / build_id

    @classmethod
    def default(cls) -> Workspace:
        return cls(artifacts=PROJECT_ROOT / "artifacts")


def recipe_search_dirs() -> list[Path]:
    """Recipes are found by name in ./recipes, then in the project's own recipes/."""
    try:
        here = [Path.cwd() / "recipes"]
    except FileNotFoundError:  # the working directory was deleted: only the project's recipes are found
        here = []
    dirs = [*here, PROJECT_ROOT / "recipes"]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique
