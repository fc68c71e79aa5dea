"""Stage 5: decode/encode through the exported VAE IRs at every precision the target runs.

Half precision runs for real where the host computes it, and is emulated on the IR
graph where OpenVINO would silently run f32 instead (AVX2 CPUs): a "f16 check" that
really ran f32 would pass the very VAE this project exists to catch. The text encoders,
the UNet and the whole pipeline's images are judged afterwards (validate/pipeline_gate.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.disk import is_no_space
from convert.errors import ConvertError, ValidationError, first_line
from convert.families.base import VAE_IO
from convert.recipe import Recipe
from validate.host import cpu_isa, openvino_version
from validate.inputs import InputSet, denoised_set, image_set
from validate.report import CheckResult, ValidationReport, save_png

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
FIX_HINT = ("substitute an FP16-fixed VAE (recipe key substitutions.vae), set components.<part>.fp16_fix: rescale or "
            "runtime-scale, or run it at f32 (target.inference_precision)")


def describe_checks(recipe: Recipe) -> list[str]:
    """The plan's view of the gate (no heavy imports)."""
    v = recipe.validation
    full = f"{v.resolution}x{v.resolution}" if v.resolution else "native resolution"
    n_full = min(v.full_resolution_images, len(v.images))
    inputs = [f"{', '.join(v.images[:n_full])} at {full}"] if n_full else []
    if v.images[n_full:]:
        inputs.append(f"{', '.join(v.images[n_full:])} at {v.small_resolution}x{v.small_resolution}")
    lines = []
    for part in recipe.gated_components():
        if not recipe.settings_for(part).export or part not in VAE_IO:
            continue
        for precision in recipe.precisions_for(part):
            how = "" if precision == "f32" else f" (on {recipe.target.device} if present and really {precision}, else emulated)"
            denoise = f"; {v.denoise_steps}-step denoise latents" if v.denoise_steps and part == "vae_decoder" else ""
            lines.append(
                f"{part} at {precision}{how}: non-finite <= {v.max_non_finite}, PSNR >= {v.min_psnr_db:g} dB "
                f"vs original VAE f32; inputs: {'; '.join(inputs)}{denoise}"
            )
    from validate.describe import describe_pipeline_checks

    lines += describe_pipeline_checks(recipe)
    if "vae" in recipe.substitutions and v.check_original:
        lines.append("original VAE at the same precisions, for comparison (reported, never gates)")
    return lines


@dataclass
class _Reference:
    """f32 outputs of the ORIGINAL VAE (torch), the yardstick for every PSNR."""

    vae: Any

    def run(self, component: str, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            t = torch.from_numpy(x)
            if component == "vae_decoder":
                return _batched(lambda b: self.vae.decode(b).sample, t)
            return _batched(lambda b: self.vae.encode(b).latent_dist.parameters, t)


def _batched(fn: Callable[[Any], Any], t: Any) -> np.ndarray:
    return np.concatenate([fn(t[i : i + 1]).float().numpy() for i in range(t.shape[0])])


def run_validation(bundle_dir: Path, patched: Any, recipe: Recipe, progress: Progress | None = None,
                   references: dict[str, Path] | None = None) -> ValidationReport:
    """`references`: quantized part -> its unquantized IR (the pipeline checks compare against it)."""
    import openvino as ov

    notify = progress or (lambda _m: None)
    settings = recipe.validation
    core = ov.Core()
    pipeline = patched.pipeline
    original_vae = patched.originals.get("vae", pipeline.vae)
    reference = _Reference(original_vae.float())
    full = settings.resolution or patched.family.native_resolution(pipeline)
    small = min(full, settings.small_resolution)
    sets: list[InputSet] = []
    # where the small side is the full one (a native size at or below small_resolution) every image is one set:
    # two sets of one name would overwrite each other's references
    n_full = len(settings.images) if small == full else min(settings.full_resolution_images, len(settings.images))
    with stage_errors("inputs", bundle_dir):
        if n_full:
            sets.append(image_set(original_vae, settings.images[:n_full], full))
        if settings.images[n_full:]:
            sets.append(image_set(original_vae, settings.images[n_full:], small))
        if settings.denoise_steps and "vae_decoder" in recipe.gated_components():
            notify(f"validate: {settings.denoise_steps}-step denoising run of the exported pipeline at {small}x{small}")
            sets.append(denoised_set(bundle_dir, patched.family, settings.prompt, settings.denoise_steps, small))

    report = ValidationReport(
        checks=[],
        thresholds={"max_non_finite": settings.max_non_finite, "min_psnr_db": settings.min_psnr_db},
        fit_checks=list(patched.checks),
        inputs={s.name: s.description for s in sets},
        cpu=cpu_isa().describe(),
    )
    targets: list[tuple[str, Any]] = [("substituted" if "vae" in patched.substituted else "shipped", None)]
    if "vae" in patched.substituted and settings.check_original:
        targets.append(("original", original_vae))
    image_dir = bundle_dir / "validation"
    started = time.monotonic()
    for part in (p for p in recipe.gated_components() if p in VAE_IO):
        xml = bundle_dir / part / "openvino_model.xml"
        if not xml.is_file():
            continue
        with stage_errors(part, bundle_dir):
            refs = {s.name: reference.run(part, _input_of(part, s)) for s in sets if _input_of(part, s) is not None}
            if part == "vae_decoder" and sets and sets[0].images is not None:
                save_png(refs[sets[0].name], image_dir / "reference_f32.png")
                report.samples["reference_f32.png"] = f"original VAE, f32 (torch), {sets[0].name}"
            for label, torch_vae in targets:
                model = core.read_model(xml) if torch_vae is None else _convert_original(torch_vae, part)
                for precision in recipe.precisions_for(part):
                    notify(f"validate: {part} {precision} ({label} VAE)")
                    report.checks += _check_all(core, model, part, label, precision, recipe, sets, refs, image_dir, report)
    report.timings["vae"] = time.monotonic() - started
    from validate.pipeline_gate import attach_pipeline_checks

    with stage_errors("pipeline", bundle_dir):
        attach_pipeline_checks(report, bundle_dir, recipe, core, full, notify, references)
    return report


@contextmanager
def stage_errors(what: str, bundle_dir: Path) -> Iterator[None]:
    """OpenVINO, torch and input errors of the stage become one ValidationError naming the component.

    A full disk or a refused write in the bundle passes through: the build names those itself.
    """
    try:
        yield
    except ConvertError:
        raise
    except Exception as e:
        if is_no_space(e) or (isinstance(e, OSError) and e.filename and Path(e.filename).is_relative_to(bundle_dir)):
            raise
        raise ValidationError(f"{what}: validation could not run on this CPU ({cpu_isa().describe()}, OpenVINO "
                              f"{openvino_version()}): {first_line(e)}",
                              hint="run with -v for the traceback and report it with this line; the converters' "
                                   "output is in the build log; a machine with another CPU may run the gate") from e


def _input_of(part: str, s: InputSet) -> np.ndarray | None:
    return s.latents if part == "vae_decoder" else s.images


def _check_all(core: Any, model: Any, part: str, label: str, precision: str, recipe: Recipe, sets: list[InputSet],
               refs: dict[str, np.ndarray], image_dir: Path, report: ValidationReport) -> list[CheckResult]:
    from validate.metrics import count_non_finite, passes_psnr, psnr
    from validate.activation_scaling import as_target_runs
    from validate.precision import activation_maxima, compile_for, emulate, plan_execution

    device = recipe.target.device if recipe.target.device in core.available_devices else "CPU"
    mode = plan_execution(core, device, precision)  # type: ignore[arg-type]
    model = as_target_runs(model, recipe.target.device, mode.device, precision)  # ACTIVATIONS_SCALE_FACTOR as the GPU applies it
    runnable = emulate(model, precision) if mode.emulated else model  # type: ignore[arg-type]
    in_name, _ = VAE_IO[part]
    where = f"{mode.device}" + ("" if device == recipe.target.device else f" (target {recipe.target.device} not present)")
    execution = f"{'emulated' if mode.emulated else 'native'}: {mode.reason}"
    results = []
    for i, s in enumerate(sets):
        x = _input_of(part, s)
        if x is None:
            continue
        # static shapes: the CPU plugin fuses each rounding subgraph (emulation ~+30% instead of ~+80%)
        runner = compile_for(core, runnable, mode, {in_name: x[:1]})
        out = np.concatenate([next(iter(runner({in_name: x[j : j + 1]}).values())) for j in range(x.shape[0])])
        del runner  # the taps compile next: two decoders compiled at once cost +3.8 GiB at 1024 (8.05 vs 4.25 GiB)
        ref = refs[s.name]
        counts = count_non_finite(out)
        data_range = 2.0 if part == "vae_decoder" else float(np.ptp(ref[:, : ref.shape[1] // 2]) or 1.0)
        value = psnr(out if part == "vae_decoder" else out[:, : out.shape[1] // 2],
                     ref if part == "vae_decoder" else ref[:, : ref.shape[1] // 2], data_range)
        maxima = activation_maxima(core, model, {in_name: x[:1]}) if i == 0 and precision == recipe.precisions_for(part)[0] else {}
        failures = []
        name = f"{part} {precision}" + (" (original VAE)" if label == "original" else "")
        if counts.invalid > recipe.validation.max_non_finite:
            failures.append(f"{name}: {counts.invalid}/{counts.total} non-finite on {s.name} "
                            f"(NaN {counts.nan}, inf {counts.posinf + counts.neginf}); {FIX_HINT}")
        elif not passes_psnr(value, recipe.validation.min_psnr_db):
            failures.append(f"{name}: PSNR {value:.2f} dB < {recipe.validation.min_psnr_db:g} dB vs the original VAE's "
                            f"f32 output on {s.name}; check the substituted VAE matches the original")
        if part == "vae_decoder" and i == 0 and s.images is not None:
            png = f"{label}_{precision}.png"
            save_png(out, image_dir / png)
            report.samples[png] = f"{label} VAE, {precision} ({execution.split(':')[0]}), {s.name}"
        results.append(CheckResult(
            component=part, vae=label, precision=precision, execution=execution, device=where, input_set=s.name,
            counts=counts,
            psnr_db=value if np.isfinite(value) or value == float("inf") else None,
            max_abs_activation=maxima, failures=failures, gating=label != "original",
        ))
    return results


def _convert_original(vae: Any, part: str) -> Any:
    """The original VAE part as an IR, traced like optimum traces the shipped one, for the comparison rows."""
    import openvino as ov
    import torch

    class Part(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if part == "vae_decoder":
                return self.vae.decode(x).sample
            return self.vae.encode(x).latent_dist.parameters

    channels = vae.config.latent_channels if part == "vae_decoder" else 3
    side = 8 if part == "vae_decoder" else 64
    example = torch.zeros(1, channels, side, side)
    with torch.no_grad():
        model = ov.convert_model(Part().eval(), example_input=example, input=[ov.PartialShape([-1, channels, -1, -1])])
    model.inputs[0].get_tensor().set_names({VAE_IO[part][0]})
    return model
