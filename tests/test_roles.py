"""Source roles are typed in memory and keep the strings lock files, build.json and build ids always held."""

from __future__ import annotations

import hashlib
import json

import pytest

from convert.recipe import load_recipe, recipe_digest
from convert.resolve import Resolution, ResolvedSource, SourceFile, source_roles
from convert.roles import SourceRole
from convert.workspace import PROJECT_ROOT

RECIPE = PROJECT_ROOT / "recipes" / "tiny-singlefile-lora.yaml"


def test_every_kind_of_source_keeps_its_serialized_name() -> None:
    roles = [role for role, _ in source_roles(load_recipe(RECIPE))]
    assert roles == [SourceRole.base(), SourceRole.config(), SourceRole.substitution("vae"), SourceRole.lora(0)]
    assert [r.key for r in roles] == ["base", "base.config", "substitutions.vae", "lora.0"]
    assert [str(r) for r in roles] == [r.key for r in roles]  # what error messages show
    assert [r.folder_name for r in roles] == ["base", "base_config", "substitutions_vae", "lora_0"]
    assert [(r.component, r.index) for r in roles] == [(None, None), (None, None), ("vae", None), (None, 0)]


@pytest.mark.parametrize(("kind", "component", "index"), [
    ("substitution", None, None), ("lora", None, None), ("base", "vae", None), ("config", None, 0), ("lora", "vae", 0),
])
def test_a_role_without_its_component_or_index_cannot_be_made(kind: str, component: str | None, index: int | None) -> None:
    with pytest.raises(ValueError, match="role"):
        SourceRole(kind, component, index)  # type: ignore[arg-type]


def test_build_id_and_lock_hash_the_role_strings_as_before() -> None:
    """The build id is sha256 of the same payload as when roles were strings: old bundles stay up to date."""
    recipe = load_recipe(RECIPE)
    sources = tuple(ResolvedSource(role, src, f"sha256:{i:064x}", (SourceFile(str(src.file), 1, "0" * 64),))
                    for i, (role, src) in enumerate(source_roles(recipe)))
    resolution = Resolution(recipe, RECIPE, sources, {"openvino": "1.0"})
    payload = {"recipe": recipe_digest(recipe), "tools": {"openvino": "1.0"},
               "sources": [{"role": key, "commit": f"sha256:{i:064x}"}
                           for i, key in enumerate(["base", "base.config", "substitutions.vae", "lora.0"])]}
    assert resolution.build_id == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    lock = resolution.lock()["sources"]
    assert [s["role"] for s in lock] == ["base", "base.config", "substitutions.vae", "lora.0"]
    assert [s.get("scale") for s in lock] == [None, None, None, 0.8]  # a LoRA's entry carries its fusion scale
    assert resolution.source(SourceRole.lora(0)) is sources[3]
