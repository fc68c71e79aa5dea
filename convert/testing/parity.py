"""Submodel parity: two IRs of one submodel on the same deterministic inputs.

Tests (tests/test_export_parity.py, tests/test_sd3.py) and the benchmark use it to show
our per-submodel export gives what optimum-intel's whole-pipeline export gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Parity:
    """How far one submodel's outputs are from a reference IR's on the same inputs."""

    component: str
    max_abs: float  # largest |ours - reference| over all outputs
    ref_max_abs: float  # largest |reference| (scale of the outputs)
    same_interface: bool  # input/output names, ranks and dynamic dimensions equal

    @property
    def relative(self) -> float:
        return self.max_abs / self.ref_max_abs if self.ref_max_abs > 0 else self.max_abs


def example_inputs(model: Any, latent_side: int = 8, seed: int = 0) -> dict[str, Any]:
    """Deterministic inputs for a submodel IR (tested on SDXL's), from its input names and shapes.

    Dynamic batch is 1, sequence 77, latents `latent_side` (images 8x that); token ids stay
    below 256 so they fit every vocabulary; the UNet gets a mid-schedule timestep.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    inputs: dict[str, Any] = {}
    for port in model.inputs:
        name, shape = port.get_any_name(), port.get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        if len(dims) == 4:
            side = latent_side * (8 if dims[1] == 3 else 1)
            dims = [1, dims[1], side, side]
        else:
            dims = [d if d is not None else (1 if i == 0 else 77) for i, d in enumerate(dims)]
        dtype = port.get_element_type().to_dtype()
        if name == "timestep":
            inputs[name] = np.full(dims, 500, dtype)
        elif np.issubdtype(dtype, np.integer):
            inputs[name] = rng.integers(0, 256, dims).astype(dtype)
        else:
            inputs[name] = rng.standard_normal(dims).astype(dtype)
    return inputs


def _interface(model: Any) -> list[tuple[str, str, str]]:
    ports = [("in", p.get_any_name(), str(p.get_partial_shape())) for p in model.inputs]
    return ports + [("out", p.get_any_name(), str(p.get_partial_shape())) for p in model.outputs]


def submodel_parity(component: str, ours: Path, reference: Path, latent_side: int = 8) -> Parity:
    """Run two IRs of one submodel on the same inputs (CPU, f32) and compare every output by name."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    results = []
    for xml in (ours, reference):
        model = core.read_model(xml)
        inputs = example_inputs(model, latent_side)
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        outputs = compiled(inputs)
        results.append((_interface(model), {p.get_any_name(): np.asarray(outputs[p]) for p in compiled.outputs}))
        del compiled, model
    (ours_if, ours_out), (ref_if, ref_out) = results
    common = [k for k in ref_out if k in ours_out and ours_out[k].shape == ref_out[k].shape]
    if not common:
        return Parity(component, float("inf"), 0.0, False)
    max_abs = max(float(np.max(np.abs(ours_out[k].astype(np.float64) - ref_out[k]))) for k in common)
    scale = max(float(np.max(np.abs(v))) for v in ref_out.values())
    return Parity(component, max_abs, scale, ours_if == ref_if and len(common) == len(ref_out))
