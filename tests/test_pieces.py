"""A submodel run as sequential pieces gives the whole model's outputs bit for bit.

The gate runs a model in pieces when its compiled weights would not fit (an fp16 SDXL UNet at
f32: 10.3 GB); the check it makes must not change. Shown on the tiny SDXL UNet for the three
graphs the gate compiles (plain f32, tapped f32 reference, f16 emulation), and through
`PartRequest`, the seam every pipeline run of the gate goes through.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from tests.test_unet_gate import _inputs, _ir
from validate import pieces
from validate.pipeline_run import PartRequest
from validate.precision import emulate, plan_execution, with_static_shapes
from validate.submodels import with_taps

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def unet() -> ov.Model:
    return _ir(overflow=True)  # overflows f16 inside: NaN/inf must come out of the pieces exactly as out of the whole


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("graph", ["plain", "taps", "f16 emulated"])
def test_pieces_give_the_whole_models_outputs(unet: ov.Model, graph: str) -> None:
    core, inputs = ov.Core(), _inputs(1)
    model, extra = unet, {}
    if graph == "taps":
        model = with_taps(unet)[0]
    elif graph == "f16 emulated":
        emulated = emulate(unet, "f16")
        model, extra = emulated.model, dict(emulated.extra_inputs)
    static = with_static_shapes(model, inputs)
    whole = core.compile_model(static, "CPU", F32).create_infer_request()
    whole.infer({**inputs, **extra})
    expected = [np.array(whole.get_output_tensor(i).data) for i in range(len(static.outputs))]

    split = pieces.split(static, 3)
    got = pieces.run_pieces(core, split, "CPU", F32, {**inputs, **extra})

    assert len(split) == 3 and all(p.outputs for p in split)
    assert len(got) == len(expected) > 0
    assert all(_same(a, b) for a, b in zip(got, expected, strict=True))
    if graph == "f16 emulated":
        assert not np.isfinite(expected[0]).all()  # the overflow the gate must see, seen through the pieces too
    # weights never cross a cut: every piece holds less than the whole, together about the whole
    whole_bytes = pieces.compiled_weight_bytes(static, "f32")
    each = [pieces.compiled_weight_bytes(p.model, "f32") for p in split]
    assert max(each) < whole_bytes <= sum(each) <= 1.05 * whole_bytes
    # what crosses a cut is activations: a handful per cut, integer ones (shape arithmetic) baked per call
    assert all(len(p.inputs) < 40 for p in split)
    assert all(name.startswith(pieces.CUT) for p in split for name in p.baked)


def test_compiled_weight_bytes_counts_float_weights_at_the_hint() -> None:
    x = ops.parameter([1, 64], np.float32, name="x")
    w16 = ops.convert(ops.constant(np.ones((64, 64), np.float16)), "f32")  # an fp16 IR's weight
    w8 = ops.multiply(ops.convert(ops.constant(np.ones((64, 64), np.int8)), "f32"),
                      ops.constant(np.ones((64, 1), np.float32)))  # int8 weight compression: stays int8
    y = ops.matmul(ops.matmul(x, w16, False, True), w8, False, True)
    model = ov.Model([y], [x])
    assert pieces.compiled_weight_bytes(model, "f32") == 64 * 64 * 4 + 64 * 4
    assert pieces.compiled_weight_bytes(model, "f16") == 64 * 64 * 2 + 64 * 2
    assert pieces.pieces_for(model, "f32") == 1


def test_piece_count_and_resident_bytes_for_a_full_size_unet() -> None:
    full = 2.57e9 * 4  # the fp16 SDXL UNet at f32
    assert pieces.piece_resident_bytes(full) <= pieces.PIECE_BYTES < full
    assert pieces.piece_resident_bytes(2.8e9) == 2.8e9  # SDXL's text_encoder_2 at f32 stays whole


@pytest.mark.parametrize("precision", ["f32", "f16"])
def test_part_request_in_pieces_records_what_the_whole_does(unet: ov.Model, precision: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    core = ov.Core()
    mode = plan_execution(core, "CPU", precision)  # f16: emulated on CPUs without f16 arithmetic
    taps = precision == "f32"

    def record() -> PartRequest:
        request = PartRequest(core, unet, mode, record=True, taps=taps and not mode.emulated)
        for step in range(2):
            request(_inputs(step))
        return request

    whole = record()
    monkeypatch.setattr(pieces, "SPLIT_ABOVE", 0)
    monkeypatch.setattr(pieces, "PIECE_BYTES", max(1, pieces.compiled_weight_bytes(unet, mode.hint) // 3))
    split = record()

    assert whole.pieces == 1 and split.pieces >= 3
    assert len(split.calls) == len(whole.calls) == 2
    for a, b in zip(split.calls, whole.calls, strict=True):
        assert a.outputs.keys() == b.outputs.keys()
        assert all(_same(a.outputs[k], b.outputs[k]) for k in a.outputs)
    assert list(split.maxima) == list(whole.maxima) and (not taps or len(whole.maxima) > 10)
    assert _same(np.array(list(split.maxima.values())), np.array(list(whole.maxima.values())))
    replayed, expected = split.run(_inputs(2)), whole.run(_inputs(2))
    assert replayed.keys() == expected.keys() and all(_same(replayed[k], expected[k]) for k in expected)


def test_block_maxima_in_pieces_find_the_same_first_overflow(unet: ov.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    from validate.pipeline_run import Call
    from validate.submodels import block_maxima, first_beyond

    core = ov.Core()
    emulated = emulate(unet, "f16")
    calls = [Call(_inputs(0), {})]
    whole_blocks, whole_ops = block_maxima(core, emulated, calls)
    monkeypatch.setattr(pieces, "SPLIT_ABOVE", 0)
    monkeypatch.setattr(pieces, "PIECE_BYTES", max(1, pieces.compiled_weight_bytes(unet, "f32") // 3))
    split_blocks, split_ops = block_maxima(core, emulated, calls)
    assert [name for name, _ in split_ops] == [name for name, _ in whole_ops] and len(whole_ops) > 10
    assert _same(np.array([v for _, v in split_ops]), np.array([v for _, v in whole_ops]))
    assert first_beyond(split_ops) == first_beyond(whole_ops) is not None
