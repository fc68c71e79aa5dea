"""The plan's lines for the pipeline checks (no OpenVINO or optimum import: `--plan` stays fast)."""

from __future__ import annotations

from convert.recipe import Recipe
from validate.submodels import SUBMODELS


def describe_pipeline_checks(recipe: Recipe) -> list[str]:
    v, e2e = recipe.validation, recipe.validation.end_to_end
    if not set(SUBMODELS) <= set(recipe.family.components):
        return []  # the end-to-end run drives an SDXL-layout pipeline (validate/pipeline_run.py)
    if not e2e.prompts:
        return ["no end-to-end run and no text-encoder/UNet checks (validation.end_to_end.prompts is empty)"]
    side = e2e.resolution or v.resolution
    size = f"{side}x{side}" if side else "native resolution"
    run = f"{len(e2e.prompts)} prompt(s), {e2e.steps} steps at {size}, guidance {e2e.guidance_scale:g}"
    lines = []
    for part in (p for p in SUBMODELS if p in v.components and recipe.settings_for(p).export):
        what = (f"{min(e2e.unet_calls, e2e.steps)} of the first prompt's {e2e.steps} UNet calls (batch 2)"
                if part == "unet" else "the prompts as the bundle's tokenizer encodes them")
        for precision in recipe.precisions_for(part):
            how = "" if precision == "f32" else f" (on {recipe.target.device} if present and really {precision}, else emulated)"
            lines.append(f"{part} at {precision}{how}: non-finite <= {v.max_non_finite}, cosine >= {v.min_cosine:g} vs the "
                         f"same IR at f32; inputs: {what}, captured from an f32 run of the bundle ({run})")
    limits = [f"non-finite <= {e2e.max_non_finite}"]
    limits += [f"SSIM >= {e2e.min_ssim:g}"] if e2e.min_ssim is not None else []
    limits += [f"PSNR >= {e2e.min_psnr_db:g} dB"] if e2e.min_psnr_db is not None else []
    for label in (p for p in recipe.target.inference_precision if p != "f32"):
        lines.append(f"end to end at {label} vs f32, same seeds ({run}): {', '.join(limits)}"
                     f"{'' if e2e.gate else ' (report only)'}; side-by-side grid and headroom charts in the report")
    return lines
