"""Run the exported pipeline itself, every submodel at a chosen precision, and record what it sees.

optimum-intel's pipeline parts call `part.request(inputs, share_inputs=True)` and read the
result by output, index or name. Replacing that request is the one seam that lets the real
pipeline code (the bundle's tokenizers, the scheduler, classifier-free guidance, SDXL's
added time ids) drive submodels compiled here: at f32 for the reference, recording every
call, or at the target precision, emulated where the host would silently run f32 instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from convert.memory import release_mapped_pages, release_memory
from validate.pieces import Piece, compiled_weight_bytes, pieces_for, run_pieces, split
from validate.precision import EmulatedModel, ExecutionMode, compile_for, emulate, with_static_shapes

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Call:
    """One submodel call: inputs as the compiled model takes them, outputs by tensor name."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def conform(model: ov.Model, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inputs as numpy in the model's element types and ranks.

    The pipeline passes torch tensors and a 0-d float timestep where the IR takes int64 [?];
    OpenVINO converts that on the fly for a dynamic model, but a static reshape needs it exact.
    """
    wanted = {p.get_any_name(): p for p in model.inputs}
    out: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
        port = wanted.get(name)
        if port is not None:
            array = array.astype(port.get_element_type().to_dtype(), copy=False)
            rank = port.get_partial_shape().rank
            if rank.is_static and array.ndim < rank.get_length():
                array = array.reshape((1,) * (rank.get_length() - array.ndim) + array.shape)
        out[name] = array
    return out


#: Compiled weights at or below this are a tiny (test-size) part: such parts keep their compiled models for the
#: whole run. Every part of a real SDXL/SD3/SD 1.x pipeline is larger (the smallest, an SD 1.x VAE decoder,
#: holds 0.2 GB at f32), so at real sizes every part still takes its turn alone.
SMALL_PART_BYTES = 64 * 2**20


class OneAtATime:
    """Lets one part of a pipeline run hold compiled models at a time.

    A full-size pipeline compiled whole does not fit a 16 GB machine: optimum's own
    compile of the flagship's parts took 13.3 GiB for a 256x256 denoising run, and the
    gate's f32 run at 1024 held the UNet (7.2 GiB at a 128x128 latent, batch 2) beside the
    VAE decoder (3.5 GiB) and both text encoders. Each part compiles when the pipeline first
    calls it and is dropped when another part compiles: a recompile per prompt (seconds for
    the VAE and text encoders, ~10-60 s for a full-size UNet) instead of their sum in memory.
    Tiny parts (`SMALL_PART_BYTES`) are the exception: they are kept together, since
    recompiling them per prompt was most of a test build's gate (29 compiles, 23 s of 49).
    """

    def __init__(self) -> None:
        self.holders: list[PartRequest] = []

    def take(self, request: PartRequest) -> None:
        """`request` is about to compile: release the other parts holding compiled models (tiny ones stay
        beside a tiny one)."""
        keep = [h for h in self.holders if h is request or (request.small and h.small)]
        for other in self.holders:
            if not any(other is k for k in keep):
                other.release()
        self.holders = [*(h for h in keep if h is not request), request]

    def release(self) -> None:
        """The run is over: drop every part's compiled models now, not when a garbage collection
        finds the pipeline's reference cycles (the full-size UNet lingered into the VAE checks: 10 GiB)."""
        for holder in self.holders:
            holder.release()
        self.holders = []


class PartRequest:
    """Stands in for one optimum part's compiled request; compiles once per input shape.

    Static shapes let the CPU plugin fuse the emulation's rounding subgraphs (see
    `with_static_shapes`); a denoising run calls the UNet with one shape throughout.
    A model whose compiled weights would not fit (an fp16 UNet at f32: 10.3 GB) runs as
    sequential pieces instead (`pieces.py`), each compiled and dropped per call.
    """

    def __init__(self, core: ov.Core, model: ov.Model, mode: ExecutionMode, *, record: bool = False,
                 taps: bool = False, turns: OneAtATime | None = None) -> None:
        """`record`: keep every call; `taps` (f32 only): also keep max |activation| per op over all calls;
        `turns`: shared by the parts of one run so that only one holds compiled models."""
        self.core, self.model, self.mode, self.record, self.turns = core, model, mode, record, turns
        self.runnable: ov.Model | EmulatedModel = emulate(model, mode.precision) if mode.emulated else model
        self.tap_names: list[str] = []
        if taps:
            from validate.submodels import with_taps

            if mode.emulated:
                raise ValueError("taps on an emulated run: use submodels.block_maxima")
            self.runnable, self.tap_names = with_taps(model)
        self.maxima: dict[str, float] = {}  # tapped op -> max |activation|, graph order
        self.calls: list[Call] = []
        self._compiled: dict[tuple[tuple[str, tuple[int, ...]], ...], Any] = {}
        graph = self.runnable.model if isinstance(self.runnable, EmulatedModel) else self.runnable
        self.pieces = pieces_for(graph, mode.hint)  # 1: compiled whole
        self.small = compiled_weight_bytes(graph, mode.hint) <= SMALL_PART_BYTES
        self._split: dict[tuple[tuple[str, tuple[int, ...]], ...], list[Piece]] = {}

    def release(self) -> None:
        """Drop the compiled models (a full-size UNet at f32 holds ~10 GiB); recorded calls and maxima stay."""
        self._split.clear()
        if self._compiled:
            self._compiled.clear()
            if not self.small:  # a collection costs ~0.4 s; a tiny part's compiled models need none
                release_memory()

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Outputs by tensor name for one call."""
        return _by_name(self._infer(conform(self.model, inputs)))

    def __call__(self, inputs: Mapping[str, Any], share_inputs: bool = True, **_: Any) -> Any:
        """What optimum calls: returns OpenVINO's result object, readable by port, index or name."""
        arrays = conform(self.model, inputs)
        result = self._infer(arrays)
        if self.record:
            self.calls.append(Call({k: v.copy() for k, v in arrays.items()}, _by_name(result)))
        return result

    def _infer(self, arrays: dict[str, np.ndarray]) -> Any:
        key = tuple(sorted((k, v.shape) for k, v in arrays.items()))
        if self.pieces > 1:
            return self._infer_in_pieces(key, arrays)
        runner = self._compiled.get(key)
        if runner is None:
            if self.turns is not None:
                self.turns.take(self)
            runner = self._compiled[key] = compile_for(self.core, self.runnable, self.mode, arrays)
            release_mapped_pages()  # the IR's mmapped weights, read once by the compile (the compiled copy stays)
        result = runner.compiled.create_infer_request().infer({**arrays, **dict(runner.extra_inputs)})
        if not self.tap_names:
            return result
        from validate.submodels import fold_maxima

        items = list(result.to_dict().items())  # taps first (`with_taps`), then the model's outputs
        n = len(self.tap_names)
        fold_maxima(self.maxima, self.tap_names, [float(v) for _, v in items[:n]])
        return _Outputs(items[n:])

    def _infer_in_pieces(self, key: tuple[tuple[str, tuple[int, ...]], ...], arrays: dict[str, np.ndarray]) -> Any:
        emulated = self.runnable if isinstance(self.runnable, EmulatedModel) else None
        graph = emulated.model if emulated else self.runnable
        if key not in self._split:
            if self.turns is not None:
                self.turns.take(self)
            static = with_static_shapes(graph, arrays)
            self._split[key] = split(static, self.pieces, self.mode.hint)
            log.info("%s runs in %d pieces at %s (its weights would not fit compiled whole)",
                     graph.get_friendly_name(), self.pieces, self.mode.hint)
        extra = dict(emulated.extra_inputs) if emulated else {}
        values = run_pieces(self.core, self._split[key], self.mode.device, {"INFERENCE_PRECISION_HINT": self.mode.hint},
                            {**arrays, **extra})
        items = list(zip(graph.outputs, values, strict=True))
        if not self.tap_names:
            return _Outputs(items)
        from validate.submodels import fold_maxima

        n = len(self.tap_names)
        fold_maxima(self.maxima, self.tap_names, [float(v) for _, v in items[:n]])
        return _Outputs(items[n:])


class _Outputs:
    """The model's own outputs of a tapped run, readable like OpenVINO's result (by port, index, name)."""

    def __init__(self, items: list[tuple[Any, np.ndarray]]) -> None:
        self._items = items

    def to_dict(self) -> dict[Any, np.ndarray]:
        return dict(self._items)

    def __getitem__(self, key: int | str) -> np.ndarray:
        if isinstance(key, int):
            return self._items[key][1]
        return next(value for port, value in self._items if key in port.get_names())


def _by_name(result: Any) -> dict[str, np.ndarray]:
    return {min(port.get_names(), default=str(i)): np.array(value, copy=True)
            for i, (port, value) in enumerate(result.to_dict().items())}


def load_pipeline(bundle_dir: Path, optimum_class: str = "OVStableDiffusionXLPipeline") -> Any:
    """The bundle as optimum-intel loads it, uncompiled (its parts get `PartRequest`s)."""
    import optimum.intel

    return getattr(optimum.intel, optimum_class).from_pretrained(bundle_dir, device="CPU", compile=False)


def run_at_f32(pipeline: Any, core: ov.Core) -> OneAtATime:
    """Every part of `pipeline` (loaded uncompiled) runs at f32 on the CPU, one part compiled at a time.

    f32 on every CPU: the default hint is bf16 where the CPU has it and f32 elsewhere, which
    made the inputs this run feeds the gate depend on the machine. Release the returned turns after the run.
    """
    mode = ExecutionMode("f32", "CPU", False, "explicit f32 hint")
    turns = OneAtATime()
    install(pipeline, {part: PartRequest(core, model, mode, turns=turns) for part, model in pipeline.ov_models.items()})
    return turns


def install(pipeline: Any, requests: Mapping[str, PartRequest]) -> None:
    """Make the pipeline's parts run through `requests` (part attribute -> request)."""
    for part, request in requests.items():
        getattr(pipeline, part).request = request


def generate(pipeline: Any, prompt: str, *, steps: int, guidance_scale: float, seed: int, **inputs: Any) -> np.ndarray:
    """One image [H, W, 3] in [0, 1], NaN kept (a black image on a device is NaN here).

    `inputs`: the size (text-to-image) or the input image (image-to-image), `inputs.run_inputs`.
    """
    result = pipeline(
        prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
        output_type="np", generator=np.random.RandomState(seed), **inputs,
    )
    return np.asarray(result.images[0], dtype=np.float32)


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices out of range(n), first and last included (all of them if k >= n)."""
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [0] if k == 1 and n else []
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
