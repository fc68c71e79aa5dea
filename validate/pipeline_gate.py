"""The gate beyond the VAE: one f32 run of the bundle's pipeline feeds every other check.

1. Generate the recipe's prompts at f32 with every submodel recording its calls (the
   reference images, and the real inputs of the text encoders and the UNet).
2. Replay those calls through each text encoder and the UNet at each target precision
   (submodels.py), with per-block headroom from an f32 tapped run.
3. Generate the same prompts, seeds and steps with every submodel at the target precision
   (emulated where `plan_execution` says so) and compare the images (end_to_end.py).
4. Draw the side-by-side grid and one headroom chart per submodel for the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convert.families import GateSpec
from convert.recipe import Recipe
from validate.end_to_end import ImageComparison, Thresholds, compare, save_grid
from validate.inputs import run_inputs
from validate.pipeline_run import Call, OneAtATime, PartRequest, evenly_spaced, generate, install, load_pipeline
from validate.precision import ExecutionMode, plan_execution
from validate.submodels import SubmodelResult, check_submodel, per_block

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
GRID = "end_to_end.png"


@dataclass
class PipelineChecks:
    """What this gate adds to the report."""

    submodels: list[SubmodelResult] = field(default_factory=list)
    images: list[ImageComparison] = field(default_factory=list)
    limits: Thresholds | None = None
    figures: dict[str, str] = field(default_factory=dict)  # png name -> caption
    maxima: dict[str, dict[str, float]] = field(default_factory=dict)  # component -> block -> max |act|
    timings: dict[str, float] = field(default_factory=dict)
    not_checked: list[str] = field(default_factory=list)  # gate parts a recipe switched off, in words


class GateSetupError(RuntimeError):
    """The end-to-end run cannot be made for this bundle: a build error, never a silent skip."""


def run_precision(recipe: Recipe, label: str, part: str) -> str:
    """The precision `part` runs at in the end-to-end run labelled `label`.

    A component pinned to other precisions (e.g. `components.unet.inference_precision: [f32]`,
    the fix for an overflowing UNet) runs at its own first precision, as it will on the device.
    """
    own = recipe.precisions_for(part)
    return label if label in own else own[0]


class _Modes:
    """ExecutionModes and compiled requests of one precision, shared by its submodel replay and end-to-end run."""

    def __init__(self, core: Any, device: str, models: dict[str, Any]) -> None:
        self.core, self.device, self.models = core, device, models
        self._requests: dict[tuple[str, str], PartRequest] = {}
        self.turns = OneAtATime()  # one part compiled at a time, the reference run's parts included

    def mode(self, precision: str) -> ExecutionMode:
        return plan_execution(self.core, self.device if precision != "f32" else "CPU", precision)  # type: ignore[arg-type]

    def request(self, part: str, precision: str) -> PartRequest:
        if (part, precision) not in self._requests:
            self._requests[part, precision] = PartRequest(self.core, self.models[part], self.mode(precision),
                                                          turns=self.turns)
        return self._requests[part, precision]

    def release(self) -> None:
        """Forget every compiled request: the next precision compiles its own, never beside this one's."""
        for request in self._requests.values():
            request.release()
        self._requests.clear()


def run_pipeline_checks(bundle_dir: Path, recipe: Recipe, core: Any, native_size: int,
                        notify: Progress | None = None, references: dict[str, Path] | None = None) -> PipelineChecks:
    """`references`: part -> its unquantized IR, for parts whose activations are quantized (convert.quantize): the
    f32 run that every check compares against runs those instead, so the checks judge what quantization did."""
    say = notify or (lambda _m: None)
    settings, e2e, family = recipe.validation, recipe.validation.end_to_end, recipe.family
    references = references or {}
    quantized = {part: quant for part, quant in recipe.quantized().items() if part in references}
    out = PipelineChecks(limits=_image_limits(recipe, quantized))
    gate = family.gate
    replayed = [p for p in (gate.checked(family.denoiser) if gate else ()) if p in recipe.gated_components()]
    if not e2e.prompts:
        out.not_checked.append("end-to-end images" + (f" and {', '.join(replayed)} on captured calls" if replayed else "")
                               + " (validation.end_to_end.prompts is empty)")
        return out
    if gate is None:
        raise GateSetupError(f"the {family.name} family declares no end-to-end run (its record has no gate); "
                             "set validation.end_to_end.prompts: [] to build without it")
    present = [p for p in gate.calls if (bundle_dir / p / "openvino_model.xml").is_file()]
    missing = [p for p in gate.calls if p not in present and p not in family.optional]
    if missing:
        raise GateSetupError(f"the end-to-end run needs {', '.join(missing)}, which the bundle lacks; export "
                             f"{'them' if len(missing) > 1 else 'it'} (components.{missing[0]}.export) or set "
                             "validation.end_to_end.prompts: [] to build without the run")
    size = e2e.resolution or settings.resolution or native_size
    steps, guidance = recipe.run_steps(), recipe.run_guidance()
    device = recipe.target.device if recipe.target.device in core.available_devices else "CPU"
    modes = _Modes(core, device, {p: core.read_model(bundle_dir / p / "openvino_model.xml") for p in present})
    checked = [p for p in replayed if p in present]
    left_out = [p for p in (gate.checked(family.denoiser)) if p in present and p not in checked]
    if left_out:
        out.not_checked.append(f"{', '.join(left_out)} on captured calls (not in validation.components)")
    call_inputs = run_inputs(family, size)

    def images(pipeline: Any) -> list[np.ndarray]:
        return [generate(pipeline, prompt, steps=steps, guidance_scale=guidance, seed=e2e.seed + i, **call_inputs)
                for i, prompt in enumerate(e2e.prompts)]

    started = time.monotonic()
    say(f"validate: f32 run of the pipeline, {len(e2e.prompts)} prompt(s), {steps} steps at {size}x{size}, "
        f"guidance {guidance:g}")
    pipeline = load_pipeline(bundle_dir, recipe.family.optimum_class)
    unquantized = {p: core.read_model(references[p]) if p in quantized else modes.models[p] for p in present}
    reference = {p: PartRequest(core, unquantized[p], modes.mode("f32"), record=p in checked, taps=p in checked,
                                turns=modes.turns) for p in present}
    install(pipeline, reference)
    f32_images = images(pipeline)
    out.timings["pipeline_f32"] = time.monotonic() - started

    captured = _captured(reference, gate, family.denoiser, checked, len(e2e.prompts), steps, e2e.unet_calls, size)
    for part in checked:  # the whole f32 run's maxima, before its compiled models go
        out.maxima[part] = per_block(reference[part].maxima)
    maxima = {part: (out.maxima[part], list(reference[part].maxima.items())) for part in checked}
    for request in reference.values():  # one full-size UNet compiled at a time: ~10 GiB each at f32
        request.release()

    del unquantized
    # a quantized bundle at f32 is not the reference: its images are judged too
    labels = [p for p in recipe.target.inference_precision if p != "f32" or quantized]
    wanted = {part: recipe.precisions_for(part) for part in checked}
    columns: dict[str, list[np.ndarray]] = {}
    checked_at: list[SubmodelResult] = []
    out.timings["submodels"] = out.timings["end_to_end"] = 0.0
    for precision in dict.fromkeys([p for part in checked for p in wanted[part]] + labels):
        started = time.monotonic()
        for part in (p for p in checked if precision in wanted[p]):
            calls, described = captured[part]
            say(f"validate: {part} {precision} on captured inputs")
            quant = quantized.get(part)
            checked_at.append(check_submodel(
                core, modes.models[part], part, modes.request(part, precision), calls, inputs=described,
                min_cosine=quant.floors()[0] if quant else settings.min_cosine, max_non_finite=settings.max_non_finite,
                maxima=maxima[part], substitutable=part in family.substitutable,
                quantized=f"int8 {quant.mode}" if quant else None))
        out.timings["submodels"] += time.monotonic() - started
        if precision in labels:
            started = time.monotonic()
            say(f"validate: end-to-end run at {precision}")
            runs = {part: run_precision(recipe, precision, part) for part in present}
            install(pipeline, {part: modes.request(part, runs[part]) for part in present})
            runs_as = {part: f"{p} {'emulated' if modes.mode(p).emulated else 'native'}"
                              + (f", int8 {quantized[part].mode}" if part in quantized else "") for part, p in runs.items()}
            columns[precision] = images(pipeline)
            out.images += [compare(image, reference_image, precision=precision, prompt=prompt, seed=e2e.seed + i,
                                   runs_as=runs_as, limits=out.limits, hint=_quantization_hint(quantized))
                           for i, (prompt, image, reference_image) in enumerate(zip(e2e.prompts, columns[precision], f32_images))]
            out.timings["end_to_end"] += time.monotonic() - started
        modes.release()
    order = {(part, p): i for i, (part, p) in enumerate((part, p) for part in checked for p in wanted[part])}
    out.submodels = sorted(checked_at, key=lambda r: order[r.component, r.precision])  # report order: part, then precision
    started = time.monotonic()
    del pipeline
    grid = [f32_images, *(columns[label] for label in labels)]
    save_grid([[column[i] for column in grid] for i in range(len(e2e.prompts))], bundle_dir / "validation" / GRID)
    first = "f32, denoiser unquantized" if quantized else "f32"
    out.figures[GRID] = f"end to end, one row per prompt: {' | '.join([first, *labels])}"
    out.timings["end_to_end"] += time.monotonic() - started
    return out


def _image_limits(recipe: Recipe, quantized: dict[str, Any]) -> Thresholds:
    """The end-to-end floors: the recipe's, or where a quantized denoiser runs, its quantization's (README)."""
    e2e = recipe.validation.end_to_end
    if not quantized:
        return Thresholds(e2e.max_non_finite, e2e.min_ssim, e2e.min_psnr_db, e2e.gate)
    _, min_ssim, min_psnr = next(iter(quantized.values())).floors()
    return Thresholds(e2e.max_non_finite, min_ssim, min_psnr, e2e.gate)


def _quantization_hint(quantized: dict[str, Any]) -> str | None:
    """What to change when a quantized pipeline's image fails, instead of the half-precision advice."""
    if not quantized:
        return None
    part, quant = next(iter(quantized.items()))
    return (f"the int8 {quant.mode} {part} changed the image: try components.{part}.quantization.mode "
            + ("hybrid or SmoothQuant (smooth_quant_alpha)" if quant.mode == "full" else "weights")
            + f", more calibration prompts, or relax components.{part}.quantization.min_ssim / min_psnr_db")


def _captured(reference: dict[str, PartRequest], gate: GateSpec, denoiser: str, checked: list[str], prompts: int,
              steps: int, denoiser_calls: int, size: int) -> dict[str, tuple[list[Call], str]]:
    """The calls each checked submodel replays, and how the report names them.

    Text encoders: every call (one per prompt). The denoiser: `denoiser_calls` of the first
    prompt's `steps` calls, evenly spaced, first and last included; its batch (2 with
    classifier-free guidance, else 1) is read from the family's latent input.
    """
    tokenized = f"{prompts} prompt(s) tokenized by the bundle's tokenizer"
    out = {part: (reference[part].calls, tokenized) for part in checked if part != denoiser}
    if denoiser in checked:
        calls = reference[denoiser].calls[:steps]
        chosen = evenly_spaced(len(calls), denoiser_calls)
        batch = calls[0].inputs[gate.latent_input].shape[0] if calls else 0
        out[denoiser] = ([calls[i] for i in chosen],
                         f"steps {', '.join(str(i + 1) for i in chosen)} of {len(calls)} (batch {batch}, {size}x{size})")
    return out


def draw_charts(folder: Path, maxima: dict[str, dict[str, float]]) -> dict[str, str]:
    """One headroom chart per submodel; returns png name -> caption."""
    from validate.charts import headroom_chart

    figures = {}
    for component, blocks in maxima.items():
        if blocks:
            name = f"headroom_{component}.png"
            headroom_chart(f"{component}: max |activation| per block (f32 run) vs f16 max 65504", blocks, folder / name)
            figures[name] = f"{component} headroom: max |activation| per block vs 65504"
    return figures


def attach_pipeline_checks(report: Any, bundle_dir: Path, recipe: Recipe, core: Any, native_size: int,
                           notify: Progress | None = None, references: dict[str, Path] | None = None) -> None:
    """Run the pipeline checks and put them, the grid and the headroom charts into `report`."""
    found = run_pipeline_checks(bundle_dir, recipe, core, native_size, notify, references)
    report.submodels, report.images, report.image_limits = found.submodels, found.images, found.limits
    report.figures |= found.figures
    report.timings |= found.timings
    report.not_checked += found.not_checked
    maxima = dict(found.maxima)
    for check in report.gating_checks:  # the shipped VAE parts, from their own checks
        if check.max_abs_activation and check.component not in maxima:
            maxima[check.component] = check.max_abs_activation
    report.figures |= draw_charts(bundle_dir / "validation", maxima)
