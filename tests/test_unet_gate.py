"""The UNet gate at module level: the overflow-prone tiny UNet fails at f16 naming its block,
its unscaled twin passes, and both agree at f32 (the overflow is invisible in f32)."""

from __future__ import annotations

import functools

import numpy as np
import openvino as ov
import pytest
import torch

from convert.testing.sdxl import UNET_OVERFLOW_BLOCK, build_tiny_unet
from validate.pipeline_run import Call, PartRequest
from validate.precision import plan_execution
from validate.submodels import block_maxima, check_submodel, submodel_block


class _Unet(torch.nn.Module):
    """The UNet with SDXL's added conditions as plain inputs (names as optimum exports them)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):  # type: ignore[no-untyped-def]
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond).sample


def _inputs(step: int) -> dict[str, np.ndarray]:
    """A classifier-free-guidance batch of 2 at a 64x64 image (8x8 latent), SDXL-like conditions."""
    rng = np.random.default_rng(step)
    return {
        "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * 14.6 / (step + 1),
        "timestep": np.array([999 - 333 * step], np.int64),
        "encoder_hidden_states": rng.standard_normal((2, 77, 96)).astype(np.float32),
        "text_embeds": rng.standard_normal((2, 64)).astype(np.float32),
        "time_ids": np.array([[64, 64, 0, 0, 64, 64]] * 2, np.float32),
    }


def _ir(overflow: bool) -> ov.Model:
    """The tiny UNet as IR, a fresh copy per call (callers change names and runtime info): converted once per
    process, as tracing and converting it costs ~16 s and four test files use it."""
    return _converted_unet(overflow).clone()


@functools.cache
def _converted_unet(overflow: bool) -> ov.Model:
    wrapper = _Unet(build_tiny_unet(0, overflow=overflow)).eval()
    example = {k: torch.from_numpy(v) for k, v in _inputs(0).items()}
    with torch.no_grad():
        model = ov.convert_model(wrapper, example_input=example)
    for port, name in zip(model.inputs, example, strict=True):
        port.get_tensor().set_names({name})
    return model


@pytest.fixture(scope="module")
def unets() -> dict[str, tuple[ov.Model, list[Call], tuple]]:
    """Both IRs, their f32 calls at three timesteps (first, middle, last) and their block maxima."""
    core = ov.Core()
    out = {}
    for label, overflow in (("twin", False), ("overflow", True)):
        model = _ir(overflow)
        recorder = PartRequest(core, model, plan_execution(core, "CPU", "f32"), record=True)
        for step in range(3):
            recorder(_inputs(step))
        out[label] = (model, recorder.calls, block_maxima(core, model, recorder.calls))
    return out


def _check(model: ov.Model, calls: list[Call], maxima: tuple, precision: str):  # type: ignore[no-untyped-def]
    core = ov.Core()
    request = PartRequest(core, model, plan_execution(core, "CPU", precision))  # type: ignore[arg-type]
    return check_submodel(core, model, "unet", request, calls, inputs="3 steps", min_cosine=0.999,
                          max_non_finite=0, maxima=maxima, substitutable=True)


def test_overflow_is_invisible_at_f32(unets) -> None:  # type: ignore[no-untyped-def]
    twin, overflow = unets["twin"][1], unets["overflow"][1]
    for a, b in zip(twin, overflow, strict=True):
        x, y = next(iter(a.outputs.values())), next(iter(b.outputs.values()))
        assert np.isfinite(y).all() and np.abs(x).max() > 0
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-3 * float(np.abs(x).max()))


def test_overflow_unet_fails_at_f16_naming_its_block(unets) -> None:  # type: ignore[no-untyped-def]
    result = _check(*unets["overflow"], "f16")
    assert not result.passed and result.invalid == result.total > 0
    assert result.first_overflow == UNET_OVERFLOW_BLOCK
    assert result.max_abs_activation[UNET_OVERFLOW_BLOCK] > 65504
    line = result.failures[0]
    assert line.startswith(f"unet f16: {result.total}/{result.total} output values non-finite on 3 steps")
    assert f"first overflow in block {UNET_OVERFLOW_BLOCK}" in line
    assert "components.unet.inference_precision: [f32]" in line and "substitutions.unet" in line
    assert result.execution.startswith("emulated"), "this host has no f16 hardware: must emulate"


def test_twin_passes_at_f16_and_both_pass_at_f32(unets) -> None:  # type: ignore[no-untyped-def]
    twin = _check(*unets["twin"], "f16")
    assert twin.passed and twin.invalid == 0 and twin.min_cosine is not None and 0.999 <= twin.min_cosine < 1
    assert max(twin.max_abs_activation.values()) < 65504 and twin.first_overflow is None
    assert _check(*unets["overflow"], "f32").passed


@pytest.mark.parametrize(("name", "block"), [
    ("__module.model.up_blocks.2.resnets.1.conv2/aten::_convolution/Add", "up_blocks.2.resnets.1"),
    ("__module.unet.down_blocks.1.attentions.0.proj_in/ov_ext::linear/Add", "down_blocks.1.attentions.0"),
    ("__module.model.mid_block.attentions.0.transformer_blocks.0.ff/Add", "mid_block.attentions.0"),
    ("__module.model.up_blocks.0.upsamplers.0.conv/aten::_convolution/Add", "up_blocks.0.upsamplers.0"),
    ("__module.model.conv_in/aten::_convolution/Add", "conv_in"),
    ("__module.model/aten::add/Add", "top-level"),
    ("__module.text_model.encoder.layers.3.mlp.fc2/ov_ext::linear/Add", "encoder.layers.3"),
    ("__module.text_projection/ov_ext::linear/MatMul", "text_projection"),
    ("self.model.conv_in.weight/fq_weights_1/convert", None),
])
def test_block_names(name: str, block: str | None) -> None:
    assert submodel_block(name) == block
