"""The plan's lines for the pipeline checks (no OpenVINO or optimum import: `--plan` stays fast)."""

from __future__ import annotations

from convert.recipe import Recipe


def describe_pipeline_checks(recipe: Recipe) -> list[str]:
    v, e2e, family = recipe.validation, recipe.validation.end_to_end, recipe.family
    replayed = [p for p in family.gate.checked(family.denoiser)] if family.gate else []
    checked = [p for p in replayed if p in recipe.gated_components() and recipe.settings_for(p).export]
    if not e2e.prompts:
        return [f"not checked: end-to-end images{' and ' + ', '.join(checked) if checked else ''} "
                "(validation.end_to_end.prompts is empty)"]
    side = e2e.resolution or v.resolution
    size = f"{side}x{side}" if side else "native resolution"
    steps, guidance = recipe.run_steps(), recipe.run_guidance()
    batch = recipe.guidance_batch()
    run = f"{len(e2e.prompts)} prompt(s), {steps} steps at {size}, guidance {guidance:g}"
    lines = []
    for part in checked:
        what = (f"{min(e2e.unet_calls, steps)} of the first prompt's {steps} {part} calls (batch {batch})"
                if part == family.denoiser else "the prompts as the bundle's tokenizer encodes them")
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
    left_out = [p for p in replayed if p not in checked and recipe.settings_for(p).export]
    if left_out:
        lines.append(f"not checked: {', '.join(left_out)} on captured calls (not in validation.components)")
    return lines
