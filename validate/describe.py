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
    quantized = recipe.quantized()
    for part in checked:
        what = (f"{min(e2e.unet_calls, steps)} of the first prompt's {steps} {part} calls (batch {batch})"
                if part == family.denoiser else "the prompts as the bundle's tokenizer encodes them")
        quant = quantized.get(part)
        floor, against = (quant.floors()[0], f"unquantized {part} at f32") if quant else (v.min_cosine, "same IR at f32")
        for precision in recipe.precisions_for(part):
            how = "" if precision == "f32" else f" (on {recipe.target.device} if present and really {precision}, else emulated)"
            lines.append(f"{part}{f' (int8 {quant.mode})' if quant else ''} at {precision}{how}: non-finite <= "
                         f"{v.max_non_finite}, cosine >= {floor:g} vs the {against}; inputs: {what}, captured from an "
                         f"f32 run of the bundle ({run})")
    min_ssim, min_psnr = (e2e.min_ssim, e2e.min_psnr_db)
    if quantized:
        _, min_ssim, min_psnr = next(iter(quantized.values())).floors()
    limits = [f"non-finite <= {e2e.max_non_finite}"]
    limits += [f"SSIM >= {min_ssim:g}"] if min_ssim is not None else []
    limits += [f"PSNR >= {min_psnr:g} dB"] if min_psnr is not None else []
    reference = "f32 with the unquantized denoiser" if quantized else "f32"
    for label in (p for p in recipe.target.inference_precision if p != "f32" or quantized):
        lines.append(f"end to end at {label} vs {reference}, same seeds ({run}): {', '.join(limits)}"
                     f"{'' if e2e.gate else ' (report only)'}; side-by-side grid and headroom charts in the report")
    left_out = [p for p in replayed if p not in checked and recipe.settings_for(p).export]
    if left_out:
        lines.append(f"not checked: {', '.join(left_out)} on captured calls (not in validation.components)")
    return lines
