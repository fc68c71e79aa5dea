"""f16/bf16 emulation: exact rounding, real-f16 verdicts on the overflow VAE, honest plans."""

from __future__ import annotations

import collections
import copy
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
import torch

from validate.metrics import count_non_finite, headroom, passes_psnr, psnr, round_to
from validate.precision import (
    MARK,
    EmulatedModel,
    activation_maxima,
    block_of,
    compile_for,
    emulate,
    emulate_f16,
    host_supports,
    measured_precision,
    module_path,
    plan_execution,
    rounding_ops,
    run_model,
)

log = logging.getLogger(__name__)
LATENT = 8  # torch half convolution on CPU is a slow fallback: keep decodes tiny


@pytest.fixture(scope="module")
def core() -> ov.Core:
    return ov.Core()


# ----------------------------------------------------------------- rounding, element by element
def _f16_probe_values() -> np.ndarray:
    """~450k f32 values: every f16, its neighbours and exact ties, random bits, the edges."""
    every = np.arange(0x7C00, dtype=np.uint16).view(np.float16)
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**31, size=100_000, dtype=np.uint32).view(np.float32)
    edges = np.array([65504, 65519.996, 65520, 65536, 1e5, 3e38, np.inf, np.nan, 2.0**-14, 2.0**-24,
                      2.0**-25, 2.0**-25 * 1.0001, 1e-40, 0.0], np.float32)
    with np.errstate(over="ignore"):  # spacing(65504) is inf in float16
        step = np.where(every < 2.0**-14, 2.0**-24, np.spacing(every).astype(np.float32))
        every = every.astype(np.float32)
        values = np.concatenate([every, np.nextafter(every, np.float32(np.inf)), every + step / 2,
                                 every + step / 4, random_bits, edges]).astype(np.float32)
    return np.concatenate([values, -values])


def _identity_model(n: int) -> ov.Model:
    """x + zero, with zero a Parameter: one op after the input, nothing to fold."""
    x = ops.parameter([n], np.float32, name="x")
    zero = ops.parameter([], np.float32, name="zero")
    return ov.Model([ops.add(x, zero).output(0)], [x, zero], "identity")


def _run_identity(core: ov.Core, emulated: EmulatedModel, x: np.ndarray) -> np.ndarray:
    return emulated.infer(core, {"x": x, "zero": np.array(0.0, np.float32)})


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnan(a) & np.isnan(b))


def test_f16_emulation_matches_numpy_float16(core: ov.Core) -> None:
    """Bit-exact from the smallest normal up, inf from 65520; subnormals within half their grid step."""
    x = _f16_probe_values()
    y = _run_identity(core, emulate_f16(_identity_model(x.size)), x)
    expected = round_to(x, "f16")
    normal = ~(np.abs(x) < 2.0**-14)  # NaN counts as normal: it must stay NaN
    agree = _same(y, expected) & normal
    log.info("f16 rounding: %d of %d normal-range values equal numpy float16", agree.sum(), normal.sum())
    assert agree.sum() == normal.sum(), list(zip(x[normal & ~agree][:5], y[normal & ~agree][:5],
                                                 expected[normal & ~agree][:5], strict=True))
    assert np.array_equal(np.signbit(y[np.isinf(y)]), np.signbit(expected[np.isinf(expected)]))
    small = ~normal
    assert small.sum() > 60_000  # every f16 subnormal, its neighbours and ties, and random tiny values
    assert np.abs(y[small].astype(np.float64) - expected[small]).max() <= 2.0**-25
    assert np.array_equal(np.signbit(y[small & (y != 0)]), np.signbit(x[small & (y != 0)]))
    edge = _run_identity(core, emulate_f16(_identity_model(4)), np.array([65504, 65519.996, 65520, -65520], np.float32))
    assert edge.tolist() == [65504.0, 65504.0, np.inf, -np.inf]


def test_f16_rounding_is_the_cheap_form() -> None:
    """Split, NaN guard and two range multiplies per point, not the abs/compare/select chain (issue 11's cost target)."""
    emulated = emulate_f16(_identity_model(8))
    inserted = collections.Counter(n.get_type_name() for n in emulated.model.get_ordered_ops()
                                   if MARK in n.get_friendly_name() and n.get_type_name() != "Parameter")
    points = 3  # x, the zero Parameter, the Add
    assert inserted == {"Multiply": 3 * points, "Subtract": 2 * points, "NotEqual": points, "Select": points}


def test_bf16_emulation_matches_bit_rounding(core: ov.Core) -> None:
    """Bit-exact from the smallest normal up to ~5.2e33 (where x * split overflows f32), inf and NaN kept; beyond,
    x unrounded (the cheap form, see `_rounding`): within bf16's half step, and finite where bf16 rounds to inf."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, size=200_000, dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, np.float32([3.3961514e38, 3.4e38, 6e33, 5e33, 1e35, -1e35, np.inf, -np.inf, np.nan,
                                       1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 3 * 2.0**-8), 2.0**-126])])
    x = x[~(np.abs(x) < 2.0**-126)]  # subnormal f32 inputs may meet the CPU's flush-to-zero
    y = _run_identity(core, emulate(_identity_model(x.size), "bf16"), x)
    expected = round_to(x, "bf16")
    with np.errstate(over="ignore"):
        exact = ~np.isinf(x * np.float32(2**16 + 1)) | np.isinf(x)  # the split's overflow, as f32 computes it
    assert exact.sum() > 180_000 and (~exact).sum() > 10_000  # random bit patterns: ~6 % lie beyond
    assert _same(y[exact], expected[exact]).all()
    assert np.isnan(y[np.isnan(x)]).all() and np.array_equal(y[np.isinf(x)], x[np.isinf(x)])
    beyond = ~exact
    assert np.array_equal(y[beyond], x[beyond])  # unrounded there ...
    finite = np.isfinite(expected[beyond])
    rel = np.abs(y[beyond][finite].astype(np.float64) / expected[beyond][finite] - 1)
    assert rel.max() <= 2.0**-8  # ... within half a bf16 step of the rounded value
    assert np.isinf(round_to(np.float32([3.4e38]), "bf16")).all() and np.isfinite(y[x == np.float32(3.4e38)]).all()


def test_bf16_rounding_is_the_cheap_form() -> None:
    """Split and NaN guard per point (5 ops): the exact form's 18 made emulated graphs 3x slower to compile."""
    emulated = emulate(_identity_model(8), "bf16")
    inserted = collections.Counter(n.get_type_name() for n in emulated.model.get_ordered_ops()
                                   if MARK in n.get_friendly_name() and n.get_type_name() != "Parameter")
    points = 3  # x, the zero Parameter, the Add
    assert inserted == {"Multiply": points, "Subtract": 2 * points, "NotEqual": points, "Select": points}


def test_overflow_only_sends_large_values_to_inf_and_keeps_the_rest(core: ov.Core) -> None:
    x = np.array([1.0 + 2.0**-20, 65519.0, 65520.0, -7e4, np.nan, 1e-30], np.float32)
    emulated = emulate_f16(_identity_model(x.size), overflow_only=True)
    y = _run_identity(core, emulated, x)
    assert _same(y, np.array([1.0 + 2.0**-20, 65519.0, np.inf, -np.inf, np.nan, 1e-30], np.float32)).all()


def test_emulation_returns_a_new_model_and_leaves_the_input_alone() -> None:
    model = _identity_model(3)
    before = [(op.get_type_name(), op.get_friendly_name()) for op in model.get_ordered_ops()]
    emulated = emulate_f16(model)
    assert [(op.get_type_name(), op.get_friendly_name()) for op in model.get_ordered_ops()] == before
    assert len(model.inputs) == 2 and len(emulated.model.inputs) == 2 + len(emulated.extra_inputs)
    assert emulated.rounding_points == 3  # x, zero, the Add


def test_shape_arithmetic_is_left_in_f32(core: ov.Core) -> None:
    """A size of 80000 computed in f32 must not become inf: real f16 runtimes keep it f32."""
    x = ops.parameter([1, 1, 1, -1], np.float32, name="x")
    width = ops.convert(ops.gather(ops.shape_of(x), ops.constant(np.array([3])), ops.constant(np.array(0))), "f32")
    size = ops.convert(ops.multiply(width, ops.constant(np.float32(2.0))), "i64")
    y = ops.interpolate(x, size, "nearest", "sizes", axes=ops.constant(np.array([3])))
    model = ov.Model([ops.swish(y).output(0)], [x])
    assert [op.get_type_name() for op in rounding_ops(model)] == ["Parameter", "Swish"]
    out = emulate_f16(model).infer(core, {"x": np.ones((1, 1, 1, 40_000), np.float32)})
    assert out.shape == (1, 1, 1, 80_000)


def test_int8_weight_decompression_is_neither_rounded_nor_tapped(core: ov.Core) -> None:
    """NNCF's u8 -> f32, minus zero point, times scale is on weights alone: only the matmul and after count."""
    x = ops.parameter([1, 4], np.float32, name="x")
    q = ops.convert(ops.constant(np.arange(8, dtype=np.uint8).reshape(2, 4)), "f32")
    zero_point = ops.convert(ops.constant(np.full((2, 1), 3, np.uint8)), "f32")
    weights = ops.multiply(ops.subtract(q, zero_point), ops.constant(np.full((2, 1), 0.5, np.float32)))
    y = ops.swish(ops.matmul(x, weights, False, True))
    model = ov.Model([y.output(0)], [x])
    assert [op.get_type_name() for op in rounding_ops(model)] == ["Parameter", "MatMul", "Swish"]
    w = (np.arange(8).reshape(2, 4) - 3) * 0.5
    expected = np.ones((1, 4)) @ w.T
    out = emulate_f16(model).infer(core, {"x": np.ones((1, 4), np.float32)})
    np.testing.assert_allclose(out, expected / (1 + np.exp(-expected)), rtol=2e-3)


# ----------------------------------------------------------------- what this host runs
def test_f16_on_this_cpu_is_emulated_with_a_reason(core: ov.Core) -> None:
    ran = measured_precision(core, "CPU", "f16")
    if ran == "f16":
        pytest.skip("this CPU computes f16 for real")
    assert not host_supports(core, "CPU", "f16")
    mode = plan_execution(core, "CPU", "f16")
    assert mode.emulated and mode.hint == "f32" and mode.precision == "f16" and mode.device == "CPU"
    assert "avx512_fp16" in mode.reason and f"silently run {ran}" in mode.reason


def test_bf16_plan_follows_the_measurement(core: ov.Core) -> None:
    mode = plan_execution(core, "CPU", "bf16")
    assert mode.emulated is not host_supports(core, "CPU", "bf16")
    assert mode.hint == ("f32" if mode.emulated else "bf16")
    assert plan_execution(core, "CPU", "f32") == plan_execution(core, "CPU", "f32")
    assert not plan_execution(core, "CPU", "f32").emulated


# ----------------------------------------------------------------- the tiny VAE decoder
@dataclass(frozen=True)
class Decoder:
    name: str
    ir: ov.Model
    f32_torch: np.ndarray  # torch f32 decode
    half_torch: np.ndarray  # torch float16 decode on CPU: the "real half" cross-check
    latent: np.ndarray


class _Decode(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def _decoder(name: str, vae: torch.nn.Module, z: torch.Tensor) -> Decoder:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # diffusers' shape asserts
        f32 = _Decode(vae)(z).numpy()
        half = _Decode(copy.deepcopy(vae).half())(z.half()).float().numpy()
        ir = ov.convert_model(_Decode(vae), example_input=z)
    return Decoder(name, ir, f32, half, z.numpy())


@pytest.fixture(scope="module")
def decoders() -> Iterator[dict[str, Decoder]]:
    """The overflow-prone tiny SDXL VAE and its FP16-fixed twin (convert/testing/sdxl.py)."""
    from convert.testing.sdxl import build_overflow_vae, fix_vae_for_fp16

    original = build_overflow_vae("tiny")
    scaling = original.config.scaling_factor
    z = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1)) / scaling
    yield {"overflow": _decoder("overflow", original, z), "fixed": _decoder("fixed", fix_vae_for_fp16(original), z)}


def _emulated_decode(core: ov.Core, d: Decoder, **kw: bool) -> tuple[np.ndarray, EmulatedModel]:
    emulated = emulate_f16(d.ir, **kw)
    out = run_model(core, emulated, {"z": d.latent}, plan_execution(core, "CPU", "f16"))
    return next(iter(out.values())), emulated


def test_f32_plan_runs_f32_not_the_cpu_default(core: ov.Core, decoders: dict[str, Decoder]) -> None:
    d = decoders["overflow"]
    out = next(iter(run_model(core, d.ir, {"z": d.latent}, plan_execution(core, "CPU", "f32")).values()))
    assert count_non_finite(d.f32_torch).all_finite
    np.testing.assert_allclose(out, d.f32_torch, atol=1e-4)  # bf16 (this CPU's default) is ~1e-2 off


def test_emulated_f16_overflows_like_torch_half(core: ov.Core, decoders: dict[str, Decoder]) -> None:
    d = decoders["overflow"]
    out, emulated = _emulated_decode(core, d)
    emulated_count, half_count = count_non_finite(out), count_non_finite(d.half_torch)
    log.info("overflow VAE: emulated f16 %s; torch half %s; %d rounding points",
             emulated_count.describe(), half_count.describe(), emulated.rounding_points)
    assert half_count.non_finite == half_count.total
    assert emulated_count.non_finite == emulated_count.total
    assert emulated_count.nan == half_count.nan  # GroupNorm over inf gives NaN in both
    assert not passes_psnr(psnr(out, d.f32_torch), 35.0)
    cheap, _ = _emulated_decode(core, d, overflow_only=True)
    assert count_non_finite(cheap).non_finite == cheap.size


def test_emulated_f16_on_the_fixed_vae_is_close_to_torch_half(core: ov.Core, decoders: dict[str, Decoder]) -> None:
    d = decoders["fixed"]
    out, emulated = _emulated_decode(core, d)
    vs_half, vs_f32 = psnr(out, d.half_torch), psnr(out, d.f32_torch)
    log.info("fixed VAE: emulated f16 vs torch half %.1f dB, vs f32 %.1f dB (torch half vs f32 %.1f dB)",
             vs_half, vs_f32, psnr(d.half_torch, d.f32_torch))
    assert count_non_finite(out).all_finite and count_non_finite(d.half_torch).all_finite
    assert passes_psnr(vs_half, 60.0) and passes_psnr(vs_f32, 50.0)
    assert 100 <= emulated.rounding_points <= 130  # 116: every conv/linear+bias, norm, swish, add, attention
    cheap, _ = _emulated_decode(core, d, overflow_only=True)
    assert count_non_finite(cheap).all_finite


def test_bias_is_rounded_once_with_its_convolution(decoders: dict[str, Decoder]) -> None:
    graph = emulate_f16(decoders["fixed"].ir).model
    for op in graph.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "MatMul"):
            consumers = {t.get_node().get_type_name() for t in op.output(0).get_target_inputs()}
            assert consumers == {"Add"}, op.get_friendly_name()


def test_bf16_hides_the_overflow(core: ov.Core, decoders: dict[str, Decoder]) -> None:
    """Why f16 must be emulated rather than trusted to the CPU: bf16 has f32's range."""
    d = decoders["overflow"]
    mode = plan_execution(core, "CPU", "bf16")
    out = next(iter(run_model(core, d.ir, {"z": d.latent}, mode).values()))
    log.info("overflow VAE at bf16 (%s): %s, %.1f dB vs f32", "emulated" if mode.emulated else "real",
             count_non_finite(out).describe(), psnr(out, d.f32_torch))
    assert count_non_finite(out).all_finite
    assert passes_psnr(psnr(out, d.f32_torch), 35.0)


def test_activation_maxima_find_the_overflowing_blocks(core: ov.Core, decoders: dict[str, Decoder]) -> None:
    inputs = {"z": decoders["overflow"].latent}
    maxima = activation_maxima(core, decoders["overflow"].ir, inputs)
    log.info("overflow VAE max |activation| per block: %s", maxima)
    assert {"decoder.mid_block", "decoder.up_blocks.0", "decoder.up_blocks.3", "decoder.conv_out"} <= set(maxima)
    worst = max(maxima, key=maxima.__getitem__)
    assert worst.startswith("decoder.up_blocks.") and headroom(maxima[worst]) < 1.0
    assert headroom(maxima["decoder.conv_out"]) > 1.0
    fixed = activation_maxima(core, decoders["fixed"].ir, inputs)
    assert all(headroom(v) > 1.0 for v in fixed.values()), fixed
    emulated = activation_maxima(core, emulate_f16(decoders["overflow"].ir), inputs)
    overflowed = [block for block, v in emulated.items() if v == np.inf]  # in forward order
    assert overflowed and overflowed[0].startswith("decoder.up_blocks.")
    only_mid = activation_maxima(core, decoders["overflow"].ir, inputs, lambda n: ".mid_block." in n)
    assert set(only_mid) == {"decoder.mid_block"}


def test_compile_for_reuses_one_compilation(core: ov.Core, decoders: dict[str, Decoder]) -> None:
    d = decoders["fixed"]
    runner = compile_for(core, d.ir, plan_execution(core, "CPU", "f16"))  # emulates a plain model itself
    first = next(iter(runner({"z": d.latent}).values()))
    assert np.array_equal(first, next(iter(runner({"z": d.latent}).values())))
    assert passes_psnr(psnr(first, d.half_torch), 60.0)


# ----------------------------------------------------------------- friendly names -> blocks
@pytest.mark.parametrize(
    ("name", "path", "block"),
    [
        ("__module.vae.decoder.up_blocks.2.resnets.0.conv2/aten::_convolution/Add",
         "decoder.up_blocks.2.resnets.0.conv2", "decoder.up_blocks.2"),
        ("__module.decoder.mid_block.attentions.0/aten::add/Add", "decoder.mid_block.attentions.0",
         "decoder.mid_block"),
        ("__module.decoder.conv_out/aten::_convolution/Add", "decoder.conv_out", "decoder.conv_out"),
        ("__module.vae.post_quant_conv/aten::_convolution/Add", "post_quant_conv", "post_quant_conv"),
        ("__module.encoder.down_blocks.1.downsamplers.0.conv/x", "encoder.down_blocks.1.downsamplers.0.conv",
         "encoder.down_blocks.1"),
        ("Result_1855", None, None),
    ],
)
def test_module_paths_and_blocks(name: str, path: str | None, block: str | None) -> None:
    assert module_path(name) == path
    assert block_of(name) == block
