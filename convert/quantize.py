"""Stage 4b: int8 activations for the denoiser, calibrated on the exported pipeline's own run.

Weight-only int8 (`nncf.compress_weights`) saves memory and disk but still computes in
floating point; on CPUs with VNNI/AMX the time goes down only when activations are int8 too
(`nncf.quantize`). That needs calibration data: here the denoiser's inputs recorded while the
exported pipeline itself generates a prompt list at f32, with the recipe's scheduler,
guidance and steps (no dataset download). Two modes, both optimum-intel's own configs:
hybrid (int8 weights for MatMul/Gather, int8 weights and activations for convolutions) and
full (int8 weights and activations everywhere, SmoothQuant, first/last convolution kept).

The unquantized IR moves to the staging folder and is the gate's reference: the gate
judges the quantized denoiser against it, not against itself at f32. A denoiser above 1 GiB of
f32 weights is quantized in pieces (convert/quantize_pieces.py): NNCF given the whole SDXL UNet
needs 36 GiB.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.errors import ExportError
from convert.recipe import ComponentSettings, QuantizationSettings, Recipe

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
OV_XML = "openvino_model.xml"
PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")


@dataclass(frozen=True)
class Quantized:
    """One denoiser quantized in the bundle, and where its unquantized IR went (the gate's reference)."""

    part: str
    mode: str
    reference: Path  # the unquantized openvino_model.xml, outside the bundle
    samples: int
    prompts: int
    steps: int
    size: int
    seconds: float

    def describe(self) -> dict[str, Any]:
        """The report's record (no paths: the reference stays in staging)."""
        return {"part": self.part, "mode": self.mode, "samples": self.samples, "prompts": self.prompts,
                "steps": self.steps, "size": self.size, "seconds": round(self.seconds, 1)}


def default_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    """The repository's calibration prompts: one per line, '#' comments and blank lines skipped."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def calibration_plan(recipe: Recipe, quant: QuantizationSettings, native_size: int) -> tuple[list[str], int, int]:
    """(prompts, steps, image side) of the calibration run, the recipe's settings over the defaults."""
    calibration = quant.calibration
    prompts = (calibration.prompts or default_prompts())[: calibration.count]
    steps = calibration.steps or recipe.run_steps()
    e2e = recipe.validation.end_to_end
    size = calibration.resolution or e2e.resolution or recipe.validation.resolution or native_size
    return prompts, steps, size


def describe(recipe: Recipe) -> list[str]:
    """The plan's lines: what each quantized denoiser is calibrated on and judged by."""
    lines = []
    for part, quant in recipe.quantized().items():
        calibration = quant.calibration
        steps = calibration.steps or recipe.run_steps()
        size = calibration.resolution or recipe.validation.end_to_end.resolution or recipe.validation.resolution
        cosine, ssim, psnr = quant.floors()
        lines.append(f"quantize {part}: int8 {quant.mode} (weights and activations), calibrated on an f32 run of the "
                     f"bundle: {calibration.count} prompt(s) x {steps} steps at "
                     f"{f'{size}x{size}' if size else 'the native size'}, batch {recipe.guidance_batch()}; judged "
                     f"against the unquantized {part}: cosine >= {cosine:g}, end to end SSIM >= {ssim:g}, PSNR >= {psnr:g} dB")
    return lines


def calibration_samples(bundle_dir: Path, recipe: Recipe, part: str, quant: QuantizationSettings, native_size: int,
                        notify: Progress) -> tuple[list[dict[str, Any]], list[str], int, int]:
    """The denoiser's inputs, every call of an f32 run of the bundle on the calibration prompts."""
    import openvino as ov

    from validate.inputs import run_inputs
    from validate.pipeline_run import PartRequest, generate, load_pipeline, run_at_f32

    prompts, steps, size = calibration_plan(recipe, quant, native_size)
    core = ov.Core()
    pipeline = load_pipeline(bundle_dir, recipe.family.optimum_class)
    turns = run_at_f32(pipeline, core)  # every part f32, one compiled at a time
    denoiser = getattr(pipeline, part).request
    recorder = PartRequest(core, denoiser.model, denoiser.mode, record=True, turns=turns)
    getattr(pipeline, part).request = recorder
    call_inputs = run_inputs(recipe.family, size)
    guidance = recipe.run_guidance()
    try:
        for i, prompt in enumerate(prompts):
            notify(f"quantize: calibration run {i + 1}/{len(prompts)} ({steps} steps at {size}x{size}, "
                   f"guidance {guidance:g}): {prompt[:60]}")
            generate(pipeline, prompt, steps=steps, guidance_scale=guidance, seed=quant.calibration.seed + i,
                     **call_inputs)
    finally:
        turns.release()
    return [call.inputs for call in recorder.calls], prompts, steps, size


def quantize_model(model: Any, quant: QuantizationSettings, settings: ComponentSettings, samples: list[dict[str, Any]],
                   notify: Progress = lambda _: None, piece_bytes: int | None = None) -> Any:
    """`model` (unquantized) with int8 activations as `quant.mode` says, through optimum-intel's configs.

    A model with more than `piece_bytes` of f32 weights (default: 1 GiB, the SDXL UNet has 10.3 GB)
    is quantized in pieces (convert/quantize_pieces.py): nncf.quantize needs about 15 bytes per
    parameter of what it is given.
    """
    from convert.quantize_pieces import PIECE_WEIGHT_BYTES, pieces_needed, quantize_in_pieces

    ignored = first_last_convolutions(model) if quant.mode == "full" and quant.keep_first_last else []

    def one(part: Any, part_samples: list[dict[str, Any]], keep: list[str]) -> Any:
        return _quantize_whole(part, quant, settings, part_samples, keep)

    parts = pieces_needed(model, piece_bytes or PIECE_WEIGHT_BYTES)
    if parts == 1:
        return one(model, samples, ignored)
    notify(f"quantize: {parts} pieces of at most {(piece_bytes or PIECE_WEIGHT_BYTES) / 2**30:.2g} GiB of f32 weights "
           "each, one nncf.quantize per piece")
    return quantize_in_pieces(model, samples, parts, one, ignored, notify)


def _quantize_whole(model: Any, quant: QuantizationSettings, settings: ComponentSettings,
                    samples: list[dict[str, Any]], ignored: list[str]) -> Any:
    import nncf

    from convert.export import compress_weights
    from convert.optimum_compat import full_quantization_config, hybrid_quantization_configs, run_full_quantization

    dataset = nncf.Dataset(samples)
    if quant.mode == "hybrid":
        weighted, config = hybrid_quantization_configs(model, len(samples), sym=_sym(settings))
        # optimum's first half (int8 weights, convolutions left out), in our memory-lean batches
        model = compress_weights(model, "hybrid", settings, only=set(weighted))
        return run_full_quantization(model, config, dataset)
    return run_full_quantization(model, full_quantization_config(len(samples), quant.smooth_quant_alpha, ignored), dataset)


def _sym(settings: ComponentSettings) -> bool:
    return bool(settings.nncf and settings.nncf.mode == "int8_sym")


def first_last_convolutions(model: Any) -> list[str]:
    """Friendly names of the first and last Convolution in graph order (a UNet's conv_in and conv_out)."""
    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return list(dict.fromkeys(convolutions[:1] + convolutions[-1:]))


def quantize_stage(bundle_dir: Path, reference_dir: Path, recipe: Recipe, native_size: int,
                   notify: Progress) -> list[Quantized]:
    """Quantize every denoiser the recipe asks for; their unquantized IRs move under `reference_dir`."""
    import openvino as ov

    from convert.export import RT_INFO_KEY, save_atomically

    done = []
    for part, quant in recipe.quantized().items():
        started = time.monotonic()
        samples, prompts, steps, size = calibration_samples(bundle_dir, recipe, part, quant, native_size, notify)
        notify(f"quantize: {part} -> int8 {quant.mode} (nncf.quantize on {len(samples)} recorded calls)")
        xml = bundle_dir / part / OV_XML
        model = ov.Core().read_model(xml)
        try:
            quantized = quantize_model(model, quant, recipe.settings_for(part), samples, notify)
        except Exception as e:  # NNCF raises many kinds; one line naming the component
            raise ExportError(f"{part}: NNCF {quant.mode} quantization failed: {type(e).__name__}: {e}",
                              hint=f"try components.{part}.quantization.mode hybrid, or weights only") from e
        quantized.set_rt_info(quant.mode, [RT_INFO_KEY, "quantization"])
        reference = reference_dir / part / OV_XML
        reference.parent.mkdir(parents=True, exist_ok=True)
        for source, dest in ((xml, reference), (xml.with_suffix(".bin"), reference.with_suffix(".bin"))):
            os.replace(source, dest)  # a rename: the model read above keeps its mapping
        save_atomically(quantized, xml, compress_to_fp16=False)
        del model, quantized
        done.append(Quantized(part, quant.mode, reference, len(samples), len(prompts), steps, size,
                              time.monotonic() - started))
        log.info("%s quantized (%s) on %d calls in %.1f s", part, quant.mode, len(samples), done[-1].seconds)
    return done
