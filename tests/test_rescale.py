"""convert.rescale on the tiny overflow-prone VAEs: scales from measured peaks, f32 fidelity, real half finiteness.

Ground truth for "finite at f16" here is torch half on CPU (real f16 rounding per op, slow: 8x8 latents).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import AutoencoderKL

from convert.errors import PatchError
from convert.rescale import (
    F16_MAX,
    apply_rescale,
    is_stream_place,
    measure_peaks,
    plan_rescale,
    power_of_two_below,
    rescale_vae,
    vae_inputs,
)
from convert.testing.sdxl import build_offstream_overflow_vae, build_overflow_vae, fix_vae_for_fp16
from validate.inputs import sample_images

HEADROOM = 8.0


def _psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB for outputs in [-1, 1] (peak-to-peak 2); any non-finite value gives -inf."""
    if not torch.isfinite(x).all():
        return -math.inf
    mse = torch.mean((x.double() - reference.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _decode(vae: AutoencoderKL, z: torch.Tensor, half: bool = False) -> torch.Tensor:
    with torch.no_grad():
        if half:
            return copy.deepcopy(vae).half().decode(z.half()).sample.float()
        return vae.decode(z).sample


def _encode(vae: AutoencoderKL, x: torch.Tensor, half: bool = False) -> torch.Tensor:
    with torch.no_grad():
        if half:
            return copy.deepcopy(vae).half().encode(x.half()).latent_dist.mean.float()
        return vae.encode(x).latent_dist.mean


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(sample_images(["astronaut", "chelsea"], 64))


@pytest.fixture(scope="module")
def overflow(images: torch.Tensor) -> dict[str, object]:
    vae = build_overflow_vae("tiny")
    inputs = vae_inputs(vae, images.numpy())
    fixed, plans = rescale_vae(vae, inputs, HEADROOM)
    return {"vae": vae, "inputs": inputs, "fixed": fixed, "plans": {p.coder: p for p in plans}}


@pytest.fixture(scope="module")
def offstream(images: torch.Tensor) -> dict[str, object]:
    vae = build_offstream_overflow_vae("tiny")
    inputs = vae_inputs(vae, images.numpy())
    fixed, plans = rescale_vae(vae, inputs, HEADROOM)
    return {"vae": vae, "inputs": inputs, "fixed": fixed, "plans": {p.coder: p for p in plans}}


# ----------------------------------------------------------------------------- planning (pure)


@pytest.mark.parametrize(("peak", "headroom", "scale"), [
    (100.0, 8.0, 1.0), (F16_MAX / 8, 8.0, 1.0), (F16_MAX / 8 * 1.01, 8.0, 0.5), (1.77e5, 8.0, 2.0**-5), (1.0e9, 1.0, 2.0**-14),
])  # fmt: skip
def test_power_of_two_below_leaves_the_headroom(peak: float, headroom: float, scale: float) -> None:
    assert power_of_two_below(peak, headroom) == scale
    assert peak * scale * headroom <= F16_MAX
    assert scale == 1.0 or peak * scale * 2 * headroom > F16_MAX  # the largest such power of two


def test_a_non_finite_f32_peak_is_refused() -> None:
    with pytest.raises(ValueError, match="not finite"):
        power_of_two_below(math.inf, 8.0)


def test_plan_takes_the_stream_maximum_and_scales_only_large_conv1() -> None:
    peaks = {
        "decoder.conv_in": 10.0, "decoder.up_blocks.2.resnets.1.conv2": 3.0e5, "decoder.up_blocks.2.resnets.1": 2.0e5,
        "decoder.up_blocks.2.resnets.1.conv1": 1.0e6, "decoder.up_blocks.2.resnets.0.conv1": 5.0,
        "decoder.up_blocks.2.resnets.1.norm2": 4.0, "encoder.conv_in": 1.0e9,
    }  # fmt: skip
    plan = plan_rescale("decoder", peaks, 2.0)
    assert plan.stream_scale == 2.0**-4 and plan.stream_peak == 3.0e5
    assert dict(plan.branch_scales) == {"decoder.up_blocks.2.resnets.1": 2.0**-5}
    assert "encoder.conv_in" not in plan.peaks
    assert dict(plan_rescale("decoder", peaks, 2.0, off_stream=False).branch_scales) == {}


@pytest.mark.parametrize(("path", "on_stream"), [
    ("decoder.conv_in", True), ("decoder.mid_block", True), ("decoder.up_blocks.2", True),
    ("decoder.up_blocks.2.resnets.1", True), ("decoder.up_blocks.2.resnets.1.conv2", True),
    ("decoder.up_blocks.2.resnets.0.conv_shortcut", True), ("decoder.mid_block.attentions.0", True),
    ("decoder.mid_block.attentions.0.to_out.0", True), ("decoder.up_blocks.0.upsamplers.0.conv", True),
    ("encoder.down_blocks.0.downsamplers.0", True), ("decoder.up_blocks.2.resnets.1.conv1", False),
    ("decoder.up_blocks.2.resnets.1.norm1", False), ("decoder.mid_block.attentions.0.to_q", False),
    ("decoder.conv_out", False), ("decoder.conv_norm_out", False),
])  # fmt: skip
def test_stream_places(path: str, on_stream: bool) -> None:
    assert is_stream_place(path) is on_stream


# ----------------------------------------------------------------------------- the overflow VAE


def test_measured_scales_of_the_overflow_vae(overflow: dict) -> None:
    plans = overflow["plans"]
    assert plans["decoder"].stream_peak > F16_MAX and plans["encoder"].stream_peak > F16_MAX
    for plan in plans.values():
        assert plan.stream_peak * plan.stream_scale * HEADROOM <= F16_MAX < plan.stream_peak * plan.stream_scale * HEADROOM * 2
        assert not plan.branch_scales  # its conv1 outputs are small
    assert overflow["fixed"].config.force_upcast is False and overflow["vae"].config.force_upcast is True


def test_rescaled_overflow_vae_is_exact_in_f32_and_finite_in_half(overflow: dict) -> None:
    vae, fixed, inputs = overflow["vae"], overflow["fixed"], overflow["inputs"]
    z, x = inputs["decoder"][:1, :, :8, :8], inputs["encoder"][:1]
    reference = _decode(vae, z)
    assert _psnr(_decode(fixed, z), reference) >= 60  # bitwise here: power-of-two scales, eps scaled too
    assert torch.equal(_decode(fixed, z), reference)
    half = _decode(fixed, z, half=True)
    assert int((~torch.isfinite(half)).sum()) == 0 and _psnr(half, reference) >= 40
    assert int((~torch.isfinite(_decode(vae, z, half=True))).sum()) == half.numel()  # the original: all NaN
    encoded = _encode(fixed, x, half=True)
    assert torch.isfinite(encoded).all()
    assert torch.allclose(_encode(fixed, x), _encode(vae, x), rtol=1e-5, atol=1e-4)


def test_saved_rescaled_vae_loses_only_the_eps_change(overflow: dict, tmp_path) -> None:
    """diffusers hard-codes GroupNorm eps: what the weights file carries is still >= 60 dB from the original."""
    vae, fixed, inputs = overflow["vae"], overflow["fixed"], overflow["inputs"]
    fixed.save_pretrained(tmp_path / "vae")
    reloaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    z = inputs["decoder"][:1, :, :8, :8]
    assert reloaded.decoder.conv_norm_out.eps == vae.decoder.conv_norm_out.eps != fixed.decoder.conv_norm_out.eps
    assert _psnr(_decode(reloaded, z), _decode(vae, z)) >= 60


def test_rescaled_peaks_all_leave_the_headroom(overflow: dict) -> None:
    for coder in ("decoder", "encoder"):
        peaks = measure_peaks(overflow["fixed"], coder, overflow["inputs"][coder])
        assert peaks and max(peaks.values()) * HEADROOM <= F16_MAX, max(peaks.items(), key=lambda kv: kv[1])


# ----------------------------------------------------------------------------- overflow off the stream


def test_offstream_overflow_needs_the_conv1_scale(offstream: dict) -> None:
    plans = offstream["plans"]
    assert set(plans["decoder"].branch_scales) == {"decoder.up_blocks.1.resnets.1"}
    assert set(plans["encoder"].branch_scales) == {"encoder.down_blocks.1.resnets.0"}
    vae, inputs = offstream["vae"], offstream["inputs"]
    z = inputs["decoder"][:1, :, :8, :8]
    reference = _decode(vae, z)
    stream_only = _decode(fix_vae_for_fp16(vae, scale=plans["decoder"].stream_scale), z, half=True)
    assert int((~torch.isfinite(stream_only)).sum()) == stream_only.numel()  # the stream-only fix fails
    full = _decode(offstream["fixed"], z, half=True)
    assert int((~torch.isfinite(full)).sum()) == 0 and _psnr(full, reference) >= 40
    assert _psnr(_decode(offstream["fixed"], z), reference) >= 60
    assert torch.isfinite(_encode(offstream["fixed"], inputs["encoder"][:1], half=True)).all()


# ----------------------------------------------------------------------------- refusals


def test_a_place_no_scale_reaches_is_an_error(images: torch.Tensor) -> None:
    vae = build_overflow_vae("tiny")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1e6)  # the image itself beyond f16: nothing to rescale
    inputs = vae_inputs(vae, images[:1].numpy())
    with pytest.raises(PatchError, match=r"^vae\.decoder\.conv_out: max \|activation\| .* still above 65504/8") as e:
        rescale_vae(vae, {"decoder": inputs["decoder"]}, HEADROOM)
    assert "substitutions.vae" in str(e.value)


def test_a_non_sdxl_resnet_is_refused() -> None:
    vae = build_overflow_vae("tiny")
    vae.decoder.mid_block.resnets[0].output_scale_factor = 2.0
    plan = plan_rescale("decoder", {"decoder.conv_in": 1e6}, HEADROOM)
    with pytest.raises(PatchError, match=r"^vae\.decoder\.mid_block\.resnets\.0: resnet is not the SDXL VAE kind"):
        apply_rescale(vae, [plan])
