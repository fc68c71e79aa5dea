"""Our per-submodel export against optimum-intel's whole-pipeline export, on the tiny pipeline.

The memory-lean export (one submodel at a time, small example inputs, fp16 loading where
lossless, compression in memory) must give the bundle optimum-intel gives: same
interfaces, same config files, same outputs on the same inputs. The reference is what
the previous exporter did: optimum's `export_from_model` of the fp32 pipeline, then each
IR saved as fp16 or compressed by NNCF as the recipe says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convert.export import OV_XML, export_pipeline, rewrite_ir
from convert.testing.parity import Parity, submodel_parity
from convert.fetch import FetchedSource
from convert.patch import patch
from convert.recipe import Recipe
from convert.roles import SourceRole

#: One weight path per component: fp32 and fp16 loading, fp16 on save, NNCF int8.
COMPONENTS = {
    "text_encoder": {"weights": "fp32"},
    "text_encoder_2": {"weights": "fp16"},
    "unet": {"weights": "int8", "nncf": {"mode": "int8_asym"}},
    "vae_decoder": {"weights": "fp16"},
    "vae_encoder": {"weights": "fp32"},
}
#: Largest |ours - optimum| / max|optimum| allowed per submodel. Measured: 0.0 (bit-identical) here and at full
#: size (BENCHMARKS.md); the margin allows for OpenVINO kernel changes, not for a different graph.
RELATIVE_TOLERANCE = 1e-5


def _recipe(base: Path) -> Recipe:
    return Recipe.model_validate({
        "schema_version": 1, "name": "parity", "base": {"local": {"path": str(base)}},
        "components": COMPONENTS, "target": {"device": "CPU", "inference_precision": ["f32"]},
    })  # fmt: skip


def _reference(base: Path, out: Path, recipe: Recipe) -> Path:
    """optimum-intel's export of the fp32 pipeline, each IR then given the recipe's weight format."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from optimum.exporters.openvino import export_from_model
    from optimum.intel import OVConfig

    pipeline = StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=torch.float32, add_watermarker=False)
    export_from_model(pipeline, out, task="text-to-image", ov_config=OVConfig(dtype="fp32"))
    for name in COMPONENTS:
        rewrite_ir(out / name / OV_XML, name, recipe.settings_for(name), ["f32"], "reference")
    return out


@pytest.fixture(scope="module")
def bundles(tiny_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tiny_sources["tiny-sdxl-base"]
    recipe = _recipe(base)
    ours = tmp_path_factory.mktemp("ours")
    patched = patch(FetchedSource(SourceRole.base(), base, "local", ()), {}, {"base": False}, recipe.family)
    export_pipeline(patched, recipe, ours, "parity")
    return ours, _reference(base, tmp_path_factory.mktemp("optimum"), recipe)


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_submodel_outputs_match_optimum(bundles: tuple[Path, Path], component: str) -> None:
    ours, reference = bundles
    parity: Parity = submodel_parity(component, ours / component / OV_XML, reference / component / OV_XML)
    print(parity, f"relative {parity.relative:.2e}")  # shown with -s: the measured tolerance
    assert parity.same_interface, f"{component}: inputs/outputs differ from optimum-intel's"
    assert parity.relative <= RELATIVE_TOLERANCE, parity


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_config_files_match_optimum(bundles: tuple[Path, Path], component: str) -> None:
    """Equal, except that we leave out `_name_or_path` (the build machine's source folder), as below."""
    ours, reference = bundles
    mine = json.loads((ours / component / "config.json").read_text())
    theirs = json.loads((reference / component / "config.json").read_text())
    theirs.pop("_name_or_path", None)
    assert mine == theirs


def test_pipeline_files_match_optimum(bundles: tuple[Path, Path]) -> None:
    """Equal, except that we leave out `_name_or_path` (the build machine's source folder)."""
    ours, reference = bundles
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json",
                "tokenizer_2/tokenizer_config.json"):
        theirs = json.loads((reference / rel).read_text())
        theirs.pop("_name_or_path", None)
        assert json.loads((ours / rel).read_text()) == theirs, rel


def test_runtime_options_match_optimum(bundles: tuple[Path, Path]) -> None:
    import openvino as ov

    core = ov.Core()
    ours, reference = bundles
    for component in ("vae_decoder", "vae_encoder"):
        mine = core.read_model(ours / component / OV_XML).get_rt_info()["runtime_options"]
        theirs = core.read_model(reference / component / OV_XML).get_rt_info()["runtime_options"]
        assert {k: mine[k].astype(str) for k in mine} == {k: theirs[k].astype(str) for k in theirs}
