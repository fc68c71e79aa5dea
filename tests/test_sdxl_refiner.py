"""The SDXL refiner beyond the family contract (tests/test_family_contract.py: build, gate, optimum-intel
img2img): one text encoder, aesthetic-score conditioning, the img2img card, and openvino-genai's refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convert.build import BuildResult, build
from convert.families.sdxl_refiner import SDXL_REFINER
from convert.package import MANIFEST, verify
from convert.workspace import PROJECT_ROOT, Workspace

TINY = PROJECT_ROOT / "recipes" / "tiny-sdxl-refiner.yaml"


@pytest.fixture(scope="module")
def refiner_build(family_build) -> BuildResult:  # type: ignore[no-untyped-def]
    return family_build(SDXL_REFINER.name)  # the contract test's build (test_family_contract.py), shared


def test_bundle_has_one_text_encoder_and_passes_the_gate(refiner_build: BuildResult) -> None:
    bundle = refiner_build.bundle
    assert verify(bundle) == []
    listed = set(json.loads((bundle / MANIFEST).read_text())["files"])
    assert "text_encoder_2/openvino_model.xml" in listed and "tokenizer_2/openvino_tokenizer.xml" in listed
    assert not any(p.startswith(("text_encoder/", "tokenizer/")) for p in listed)
    report = json.loads((bundle / "validation" / "report.json").read_text())
    assert report["headline"]["passed"] is True
    assert any(s.startswith("denoise@") for s in report["inputs"])
    unet_config = json.loads((bundle / "unet" / "config.json").read_text())
    assert unet_config["projection_class_embeddings_input_dim"] == 5 * 8 + 64  # aesthetic score: 5 time ids
    card = (bundle / "README.md").read_text()
    assert "pipeline_tag: image-to-image" in card and "image=load_image(" in card


def test_openvino_genai_does_not_know_the_refiner_yet(refiner_build: BuildResult) -> None:
    """Recorded as genai_class None; this fails (and says to set it) once openvino-genai supports it."""
    import openvino as ov
    import openvino_genai

    assert SDXL_REFINER.genai_class is None
    image = ov.Tensor(np.zeros((1, 64, 64, 3), dtype=np.uint8))
    with pytest.raises(RuntimeError, match="Unsupported image to image generation pipeline 'StableDiffusionXLImg2ImgPipeline'"):
        openvino_genai.Image2ImagePipeline(str(refiner_build.bundle), "CPU").generate("a cat", image, num_inference_steps=2)
