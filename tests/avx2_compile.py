"""Child process of tests/test_host.py: compiles the f16-emulated tiny UNet the way the gate does.

Run under an AVX2-only CPU: `ONEDNN_MAX_CPU_ISA=AVX2` (OpenVINO's JIT limited to AVX2 code, any
x86-64 host, seconds) or `qemu-x86_64 -cpu Haswell` (a real AVX2 CPU as CPUID reports it, minutes).
Imports no torch: the parent hands over the IR and the inputs. Writes outputs and facts to argv[3].
Usage: python tests/avx2_compile.py UNET.xml INPUTS.npz OUT.npz [--quick] [--f32]
(--f32: compile at the f32 hint instead, as the gate's reference run does; for int8-weight IRs)
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from validate.host import compile_on_host, cpu_isa, is_register_pool_error  # noqa: E402
from validate.pipeline_run import Call  # noqa: E402
from validate.precision import ExecutionMode, Runner, compile_for, emulate, with_static_shapes  # noqa: E402
from validate.submodels import block_maxima  # noqa: E402

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.retries += "unfused NaN guards" in record.getMessage()


def main(ir: str, inputs_npz: str, out: str, quick: bool, f32: bool = False) -> None:
    counter = _Count()
    logging.getLogger("validate.host").addHandler(counter)
    logging.getLogger("validate.host").setLevel(logging.INFO)
    core = ov.Core()
    model = core.read_model(ir)
    inputs = dict(np.load(inputs_npz))
    facts: dict[str, object] = {"isa": cpu_isa().describe()}
    emulated = emulate(model, "f16")
    if f32:  # the gate's f32 reference path (the IR as it is, explicit f32 hint, static shapes)
        runner = compile_for(core, model, ExecutionMode("f32", "CPU", False, "test"), inputs)
        output = next(iter(runner(inputs).values()))
    elif quick:  # one compile (minutes under qemu): the gate's path, which tells whether the fused form failed
        host = compile_on_host(core, with_static_shapes(emulated.model, inputs), "CPU", F32)
        facts["fallback"] = host.fallback
        output = next(iter(Runner(host.compiled, emulated.extra_inputs)(inputs).values()))
    else:
        try:
            core.compile_model(with_static_shapes(emulated.model, inputs), "CPU", F32)
            facts["fused"] = "compiled"
        except RuntimeError as e:
            facts["fused"] = "register pool" if is_register_pool_error(e) else str(e).strip().splitlines()[-1]
        runner = compile_for(core, model, ExecutionMode("f16", "CPU", True, "test"), inputs)
        output = next(iter(runner(inputs).values()))
        blocks, _ = block_maxima(core, emulated, [Call(inputs, {})])
        facts["tapped_blocks"] = len(blocks)
        facts["fused_failures_paid"] = counter.retries  # the tapped compile knew from the first one
    np.savez(out, output=output)
    Path(out).with_suffix(".json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--quick" in sys.argv[4:], "--f32" in sys.argv[4:])
