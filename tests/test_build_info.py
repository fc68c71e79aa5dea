"""build.json is a typed record (package.BuildInfo): written by a build, read back and validated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from convert import package
from convert.errors import PackageError


def test_build_json_round_trips(tiny_build) -> None:
    info = package.read_build_info(tiny_build.bundle)
    text = (tiny_build.bundle / package.BUILD_INFO).read_text()
    assert json.dumps(info.model_dump(mode="json"), indent=2) + "\n" == text  # byte for byte
    assert info.build_id == tiny_build.build_id and info.recipe.family.name == "stable-diffusion-xl"
    assert info.components == tiny_build.components  # the typed records the build returned, read back
    assert all(s.repo is None for s in info.lock.sources)  # generated sources: no Hub keys written
    assert "repo" not in json.loads(text)["lock"]["sources"][0]


def test_a_build_json_this_tool_cannot_read_is_refused(tiny_build, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_build.bundle, copy)
    data = json.loads((copy / package.BUILD_INFO).read_text())
    data["components"][0]["weights"] = 8
    (copy / package.BUILD_INFO).write_text(json.dumps(data))
    with pytest.raises(PackageError) as info:
        package.read_build_info(copy)
    assert str(info.value) == (f"{copy}: build.json does not fit this tool's schema at components.0.weights: "
                               "Input should be a valid string; rebuild it with this version of `convert`")


def test_components_keep_their_json_shape(tiny_build) -> None:
    """`--json` lists each component as before the records were typed: no cache_key for a tokenizer."""
    rows = tiny_build.to_json()["components"]
    assert [list(r) for r in rows if r["name"].startswith("tokenizer")] == [
        ["name", "weights", "inference_precision", "runtime_options", "files"]] * 2
    unet = next(r for r in rows if r["name"] == "unet")
    assert list(unet) == ["name", "weights", "inference_precision", "runtime_options", "files", "cache_key"]
    assert unet["files"] == ["unet/openvino_model.xml"] and len(unet["cache_key"]) == 32
    built = json.loads((tiny_build.bundle / package.BUILD_INFO).read_text())["components"]
    assert [c["cache_key"] for c in built if c["name"].startswith("tokenizer")] == [None, None]  # build.json keeps null
