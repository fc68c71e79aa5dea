"""Child process of tests/test_tap_memory.py: peak memory of one decode, tapped or not.

Run as `python tests/tap_memory.py IR_XML SIDE MODE`, MODE one of plain, maxima (the VAE
checks' `activation_maxima`), blocks (the UNet gate's `submodels.block_maxima`), appended
(taps placed after the model's outputs: the layout that kept every tapped tensor alive).
Prints one JSON line: the growth of the peak RSS over the RSS before the compile, in MiB.
A process of its own, because a peak only ever grows. The peak is this process's VmHWM, not
ru_maxrss: Linux carries the parent's peak RSS across exec into ru_maxrss, so a child of a
pytest process grown to a few GiB measured a growth of 0 for every mode.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import openvino as ov


def _peak_mib() -> float:
    """The high-water RSS of this process's own memory map (kB in /proc/self/status), in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def main(xml: str, side: int, mode: str) -> None:
    from validate.pipeline_run import Call
    from validate.precision import activation_maxima, with_static_shapes
    from validate.submodels import block_maxima, with_taps

    core = ov.Core()
    model = core.read_model(xml)
    name = model.inputs[0].get_any_name()
    x = np.random.RandomState(0).randn(1, 4, side, side).astype(np.float32)
    before = _peak_mib()
    if mode == "plain":
        core.compile_model(with_static_shapes(model, {name: x}), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)
    elif mode == "maxima":
        activation_maxima(core, model, {name: x})
    elif mode == "blocks":
        block_maxima(core, model, [Call({name: x}, {})])
    elif mode == "appended":
        tapped, names = with_taps(model)
        appended = ov.Model(list(tapped.get_results())[len(names):] + list(tapped.get_results())[:len(names)],
                            list(tapped.get_parameters()))
        core.compile_model(with_static_shapes(appended, {name: x}), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps({"mode": mode, "growth_mib": round(_peak_mib() - before, 1)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
