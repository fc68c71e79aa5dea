"""validate.activation_scaling: the GPU plugin's ACTIVATIONS_SCALE_FACTOR rewrite, checked two ways.

1. In f32 the rewritten IR computes the same function (the rewrite only moves powers of two).
2. Under emulated f16, its verdict per factor (finite, headroom, PSNR) equals the verdict of a
   direct reimplementation: the tiny overflow VAE decoder written out in torch functional
   ops from its own modules, every op's result rounded to float16 (IEEE, round to nearest
   even, overflow to inf) and held the way the GPU holds it after the rewrite: the
   residual stream and every conv/linear output divided by s, norms with eps / s**2, and
   values multiplied back by s only in front of attention and at the output.
"""

from __future__ import annotations

import math

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
import torch
import torch.nn.functional as F

from convert.testing.sdxl import build_overflow_vae
from validate.activation_scaling import (
    F16_MAX,
    judge_factor,
    pending_exponents,
    runtime_factor,
    scale_activations,
    set_runtime_factor,
)
from validate.checks import _convert_original
from validate.inputs import encode_images, sample_images
from validate.metrics import psnr

MIN_PSNR_DB = 40.0
MIN_HEADROOM = 4.0


# ----------------------------------------------------------------------------- the reimplementation


class _Rounded:
    """float16 rounding of every op result, recording the largest |value| before rounding."""

    def __init__(self) -> None:
        self.max_abs = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.detach().abs().amax().item() if x.numel() else 0.0
        self.max_abs = max(self.max_abs, peak if math.isfinite(peak) else math.inf)
        return x.half().float()


def _w(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().half().float()


def reference_decode(vae, latents: np.ndarray, s: float) -> tuple[np.ndarray, float]:
    """Decode in emulated f16 as the GPU does with activation scale `s`; returns (image, max |f16 value|)."""
    r = _Rounded()

    def conv(m: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:  # x held / s -> output held / s
        return r(F.conv2d(x, _w(m.weight), _w(m.bias) / s, m.stride, m.padding))

    def linear(m: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return r(F.linear(x, _w(m.weight), None if m.bias is None else _w(m.bias) / s))

    def norm(m: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:  # x held / s -> true scale
        return r(F.group_norm(x, m.num_groups, _w(m.weight), _w(m.bias), m.eps / s**2))

    def down(x: torch.Tensor) -> torch.Tensor:  # true scale -> / s, in front of a conv/linear
        return r(x / s)

    def resnet(block, h: torch.Tensor) -> torch.Tensor:
        t = conv(block.conv1, down(r(F.silu(norm(block.norm1, h)))))
        t = conv(block.conv2, down(r(F.silu(norm(block.norm2, t)))))
        shortcut = conv(block.conv_shortcut, h) if block.conv_shortcut is not None else h
        return r(shortcut + t)

    def attention(attn, h: torch.Tensor) -> torch.Tensor:
        b, c, height, width = h.shape
        n = norm(attn.group_norm, h).view(b, c, height * width).transpose(1, 2)
        heads = attn.heads

        def project(m: torch.nn.Linear) -> torch.Tensor:  # the pending *s is a real multiply before SDPA
            y = r(linear(m, down(n)) * s)
            return y.view(b, -1, heads, y.shape[-1] // heads).transpose(1, 2)

        o = r(F.scaled_dot_product_attention(project(attn.to_q), project(attn.to_k), project(attn.to_v)))
        o = o.transpose(1, 2).reshape(b, -1, c)
        o = linear(attn.to_out[0], down(o)).transpose(1, 2).reshape(b, c, height, width)
        return r(o + h)

    d = vae.decoder
    with torch.no_grad():
        h = conv(vae.post_quant_conv, down(r(torch.from_numpy(latents))))
        h = conv(d.conv_in, h)
        h = resnet(d.mid_block.resnets[0], h)
        for attn, block in zip(d.mid_block.attentions, d.mid_block.resnets[1:], strict=True):
            h = resnet(block, attention(attn, h))
        for up in d.up_blocks:
            for block in up.resnets:
                h = resnet(block, h)
            for sampler in up.upsamplers or []:
                h = conv(sampler.conv, F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = conv(d.conv_out, down(r(F.silu(norm(d.conv_norm_out, h)))))
        return r(h * s).numpy(), r.max_abs


def reference_verdict(image: np.ndarray, max_abs: float, f32: np.ndarray) -> bool:
    finite = bool(np.isfinite(image).all())
    return finite and psnr(image, f32, 2.0) >= MIN_PSNR_DB and max_abs * MIN_HEADROOM <= F16_MAX


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def decoder() -> dict[str, object]:
    vae = build_overflow_vae("tiny")
    latents = encode_images(vae, sample_images(["astronaut"], 64))
    model = _convert_original(vae, "vae_decoder")
    with torch.no_grad():
        f32 = vae.decode(torch.from_numpy(latents)).sample.numpy()
    return {"vae": vae, "latents": latents, "model": model, "f32": f32}


def _f32_run(model: ov.Model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(inputs)[0])


# ----------------------------------------------------------------------------- the rewrite itself


def test_rewrite_keeps_the_f32_function_and_restores_only_where_the_gpu_does(decoder: dict) -> None:
    model, latents = decoder["model"], decoder["latents"]
    scaled = scale_activations(model, 128.0)
    convs = sum(n.get_type_name() == "Convolution" for n in model.get_ordered_ops())
    matmuls = sum(n.get_type_name() == "MatMul" for n in model.get_ordered_ops())
    norms = sum(n.get_type_name() == "GroupNormalization" for n in model.get_ordered_ops())
    assert scaled.scaled_ops == convs + matmuls and scaled.absorbed_norms == norms
    # q, k, v in front of attention and the image at the output: nothing else is restored to full size
    assert len(scaled.restored) == 4 and "conv_out" in scaled.restored[-1]
    assert sum("attentions.0" in name for name in scaled.restored) == 3
    original = _f32_run(model, {"latent_sample": latents})
    rewritten = _f32_run(scaled.model, {"latent_sample": latents})
    assert psnr(rewritten, original, 2.0) > 90


def test_rewrite_of_an_ir_with_fp16_weights(decoder: dict, tmp_path) -> None:
    """fp16 weights come back as Convert(Constant): biases are still divided as constants."""
    ov.save_model(decoder["model"], tmp_path / "d.xml", compress_to_fp16=True)
    model = ov.Core().read_model(tmp_path / "d.xml")
    scaled = scale_activations(model, 64.0)
    adds = [n for n in scaled.model.get_ordered_ops() if n.get_type_name() == "Add"]
    biases = [a for a in adds if any(v.get_node().get_type_name() == "Constant" for v in a.input_values())]
    assert len(biases) == scaled.scaled_ops  # every bias Add reads a plain (divided) constant
    inputs = {"latent_sample": decoder["latents"]}
    assert psnr(_f32_run(scaled.model, inputs), _f32_run(model, inputs), 2.0) > 90


def test_add_of_a_scaled_and_an_unscaled_branch_restores_the_scaled_one() -> None:
    """LPT moves *s through an Add only when both inputs carry it: a plain activation keeps it real."""
    x = ops.parameter([1, 2, 4, 4], np.float32, name="x")
    weights = ops.constant(np.full((2, 2, 1, 1), 0.5, np.float32))
    conv = ops.convolution(x, weights, [1, 1], [0, 0], [0, 0], [1, 1])
    both = ops.add(conv, ops.convolution(x, weights, [1, 1], [0, 0], [0, 0], [1, 1]))
    mixed = ops.add(both, ops.relu(x))  # relu(x) is unscaled: here the pending *s must materialise
    model = ov.Model([mixed.output(0)], [x])
    pending = pending_exponents(model)
    assert pending[(both.get_name(), 0)] == 1 and (mixed.get_name(), 0) not in pending
    scaled = scale_activations(model, 64.0)
    assert scaled.restored == [both.get_friendly_name()]
    data = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_f32_run(scaled.model, {"x": data}), _f32_run(model, {"x": data}), rtol=1e-6)


@pytest.mark.parametrize("factor", [0.5, 0.0, 2.0**15, math.nan])
def test_factor_must_be_in_range(decoder: dict, factor: float) -> None:
    with pytest.raises(ValueError, match=r"must be in \[1, 16384\]"):
        scale_activations(decoder["model"], factor)


def test_rt_info_factor_round_trip(decoder: dict) -> None:
    model = decoder["model"].clone()
    model.set_rt_info("8", ["runtime_options", "KV_CACHE_PRECISION"])
    assert runtime_factor(model) is None
    set_runtime_factor(model, 32.0)
    assert runtime_factor(model) == 32.0
    set_runtime_factor(model, None)
    assert runtime_factor(model) is None
    assert model.get_rt_info(["runtime_options", "KV_CACHE_PRECISION"]).astype(str) == "8"


# ----------------------------------------------------------------------------- rewrite vs reimplementation


@pytest.mark.parametrize("factor", [1.0, 4.0, 8.0, 16.0, 32.0, 1024.0])
def test_rewrite_verdict_equals_the_reimplementation(decoder: dict, factor: float) -> None:
    latents, f32 = decoder["latents"], decoder["f32"]
    image, max_abs = reference_decode(decoder["vae"], latents, factor)
    expected = reference_verdict(image, max_abs, f32)
    trial = judge_factor(ov.Core(), decoder["model"], factor, [{"latent_sample": latents}], [f32],
                         lambda out, ref: psnr(out, ref, 2.0), MIN_PSNR_DB, MIN_HEADROOM)
    assert trial.passed is expected, (trial.summary(), max_abs)
    # and they hold the same values: same largest f16 value, same output where finite
    if math.isfinite(max_abs):
        assert trial.max_abs == pytest.approx(max_abs, rel=1e-2)  # rounding paths differ slightly
        assert trial.non_finite == 0 and trial.psnr_db is not None
        assert abs(trial.psnr_db - psnr(image, f32, 2.0)) < 2.0
    else:
        assert trial.non_finite > 0 and not np.isfinite(image).all()


def test_the_factors_span_every_outcome(decoder: dict) -> None:
    """The parametrized factors above are not all alike: overflow, too little headroom, and a pass."""
    latents, f32 = decoder["latents"], decoder["f32"]
    outcomes = {}
    for factor in (1.0, 8.0, 32.0):
        image, max_abs = reference_decode(decoder["vae"], latents, factor)
        outcomes[factor] = (bool(np.isfinite(image).all()), max_abs * MIN_HEADROOM <= F16_MAX)
    assert outcomes == {1.0: (False, False), 8.0: (True, False), 32.0: (True, True)}
