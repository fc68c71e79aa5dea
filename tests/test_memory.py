"""Giving back the pages of mapped weight files (convert/memory.py) and compiled requests; int8 compression in passes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from convert.memory import clean_mappings, release_memory
from validate.pipeline_run import PartRequest
from validate.precision import plan_execution

SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 fd:01 11 /data/unet/openvino_model.bin
Size:               1024 kB
Rss:                 512 kB
Anonymous:             0 kB
7f0000100000-7f0000200000 rw-p 00000000 fd:01 12 /data/vae/openvino_model.bin
Size:               1024 kB
Anonymous:             4 kB
7f0000200000-7f0000300000 r-xp 00000000 fd:01 13 /lib/weights.bin
Anonymous:             0 kB
7f0000300000-7f0000400000 r--p 00000000 fd:01 14 /data/text_encoder/model.safetensors
Anonymous:             0 kB
7f0000400000-7f0000500000 r--p 00000000 fd:01 15 /data/notes.txt
Anonymous:             0 kB
"""


def test_clean_mappings_picks_unwritten_weight_files_only(tmp_path: Path) -> None:
    smaps = tmp_path / "smaps"
    smaps.write_text(SMAPS)
    assert clean_mappings((".bin",), smaps) == [(0x7F0000000000, 0x7F0000100000)]  # written and executable skipped
    assert clean_mappings((".bin", ".safetensors"), smaps) == [(0x7F0000000000, 0x7F0000100000),
                                                                (0x7F0000300000, 0x7F0000400000)]
    assert clean_mappings((".bin",), tmp_path / "missing") == []


def _resident_kib(path: Path) -> int:
    """Rss of this process's mappings of `path`, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and ":" not in head[0] and len(head) >= 5:
            inside = len(head) == 6 and head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_release_drops_read_pages_and_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    expected = np.arange(4 * 2**20, dtype=np.float32)  # 16 MiB
    expected.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    assert float(mapped.sum(dtype=np.float64)) == float(expected.sum(dtype=np.float64))  # every page read
    before = _resident_kib(path)
    assert before >= 15 * 1024
    release_memory((".bin",))
    assert _resident_kib(path) < before / 4
    np.testing.assert_array_equal(mapped, expected)  # read back from the page cache


def test_a_released_request_compiles_again_with_the_same_result() -> None:
    x = ops.parameter([1, 8], ov.Type.f32, name="x")
    model = ov.Model([ops.multiply(x, ops.constant(np.full((1, 8), 3.0, np.float32)))], [x])
    model.inputs[0].get_tensor().set_names({"x"})
    core = ov.Core()
    request = PartRequest(core, model, plan_execution(core, "CPU", "f32"))
    inputs = {"x": np.arange(8, dtype=np.float32).reshape(1, 8)}
    first = request.run(inputs)
    request.release()
    again = request.run(inputs)
    assert list(first) == list(again)
    np.testing.assert_array_equal(next(iter(again.values())), inputs["x"] * 3)


class _Part:
    """What `OneAtATime` reads of a part: its size class, and a release that is counted."""

    def __init__(self, small: bool) -> None:
        self.small, self.released = small, 0

    def release(self) -> None:
        self.released += 1


def test_one_at_a_time_keeps_tiny_parts_together_and_real_ones_alone() -> None:
    from validate.pipeline_run import SMALL_PART_BYTES, OneAtATime

    assert SMALL_PART_BYTES < 200 * 2**20  # the smallest real part (an SD 1.x VAE decoder at f32) takes its turn
    turns = OneAtATime()
    text, unet, vae = _Part(True), _Part(True), _Part(True)
    for part in (text, unet, vae, text, unet):  # a tiny pipeline called prompt after prompt: nothing recompiles
        turns.take(part)  # type: ignore[arg-type]
    assert [p.released for p in (text, unet, vae)] == [0, 0, 0]
    big = _Part(False)
    turns.take(big)  # type: ignore[arg-type]
    assert [p.released for p in (text, unet, vae)] == [1, 1, 1] and turns.holders == [big]
    turns.take(text)  # type: ignore[arg-type]
    assert big.released == 1 and turns.holders == [text]
    turns.release()
    assert text.released == 2 and turns.holders == []


def test_int8_weights_in_passes_are_the_weights_of_one_call(caplog: pytest.LogCaptureFixture) -> None:
    """What keeps the SDXL UNet's int8 compression under its peak (`INT8_PASSES` batches of layers, the replaced
    weights released between them) must not change a weight. The tiny UNet is small enough for one call
    (`PASSES_FROM_BYTES`); here it is made to take the passes."""
    from convert.export import INT8_PASSES, compress_weights
    from convert.recipe import ComponentSettings
    from tests.test_unet_gate import _ir

    settings = ComponentSettings.model_validate({"weights": "int8", "nncf": {"mode": "int8_asym"}})
    model = _ir(False)
    one = compress_weights(model.clone(), "unet", settings)
    with caplog.at_level(logging.DEBUG, logger="convert.export"):
        passes = compress_weights(model.clone(), "unet", settings, passes_from_bytes=0)
    assert f"unet: int8 weights in {INT8_PASSES} pass(es)" in caplog.messages

    def constants(m: ov.Model) -> dict[str, np.ndarray]:
        return {op.get_friendly_name(): op.get_data() for op in m.get_ops() if op.get_type_name() == "Constant"}

    a, b = constants(one), constants(passes)
    assert sum(v.dtype == np.uint8 for v in a.values()) > 50  # compressed, both
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
