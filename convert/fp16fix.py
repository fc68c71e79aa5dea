"""The recipe's `fp16_fix` per VAE part, carried out: rescale in the patch stage, scale factors after export.

* `rescale` (patch stage): `convert.rescale` on the loaded VAE from activations measured on
  the recipe's validation photos; the rescaled VAE is written to the staging folder and
  exported in place of the loaded one. The unpatched VAE stays the yardstick.
* `runtime-scale` (after export): the smallest power of two whose emulated f16 run, as
  the GPU plugin rewrites the graph, passes with the recipe's headroom and PSNR floor is
  written to the IR's runtime_options/ACTIVATIONS_SCALE_FACTOR; none passing: no factor,
  and the gate fails the part.
* `none`, `substitute`, `rescale`: the IR carries no ACTIVATIONS_SCALE_FACTOR unless the
  recipe's runtime_options sets one. optimum-intel writes 128 for force_upcast VAEs, which
  only an Intel GPU honours; the gate must judge what every f16 device runs.

Each part leaves a record (mode, scales or factors tried, fidelity) for the report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convert.recipe import VAE_PARTS, Recipe

if TYPE_CHECKING:
    from convert.rescale import Coder

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
CODER: dict[str, Coder] = {"vae_decoder": "decoder", "vae_encoder": "encoder"}
IN_NAME = {"vae_decoder": "latent_sample", "vae_encoder": "sample"}


_PLAN = {
    "substitute": "the substituted VAE",
    "rescale": "weights rescaled from activations measured on the validation photos (patch stage)",
    "runtime-scale": "smallest power-of-two ACTIVATIONS_SCALE_FACTOR passing emulated f16, written to rt_info",
    "none": "no fix; any ACTIVATIONS_SCALE_FACTOR from optimum-intel removed",
}


def describe(recipe: Recipe) -> list[str]:
    """The plan's lines for each exported VAE part's fp16_fix (no heavy imports)."""
    return [f"{part} fp16_fix {recipe.fp16_fix_for(part)}: {_PLAN[recipe.fp16_fix_for(part)]}"
            for part in VAE_PARTS if recipe.settings_for(part).export]


def _photos(recipe: Recipe, patched: Any) -> list[np.ndarray]:
    """The gate's photos at the gate's sizes: the first `full_resolution_images` at full size, the rest small.

    Peaks grow with the image side, so a scale chosen on small images alone can fall short.
    """
    from validate.inputs import sample_images

    v = recipe.validation
    full = v.resolution or patched.family.native_resolution(patched.pipeline)
    n_full = min(v.full_resolution_images, len(v.images))
    sets = [(v.images[:n_full], full), (v.images[n_full:], min(full, v.small_resolution))]
    return [sample_images(names, size) for names, size in sets if names]


def rescale_stage(patched: Any, recipe: Recipe, folder: Path, notify: Progress) -> list[dict[str, Any]]:
    """Apply `rescale` to the VAE parts that ask for it; point the export at the rescaled weights."""
    from convert.patch import weight_source
    from convert.rescale import rescale_vae, vae_inputs

    parts = [p for p in VAE_PARTS if recipe.settings_for(p).export and recipe.fp16_fix_for(p) == "rescale"]
    if not parts:
        return []
    notify(f"patch: rescaling {', '.join(parts)} for f16 from measured activations")
    vae = patched.pipeline.vae
    sets = [vae_inputs(vae, photos) for photos in _photos(recipe, patched)]
    inputs = {CODER[p]: [s[CODER[p]] for s in sets] for p in parts}
    headroom = recipe.validation.min_f16_headroom
    fixed, plans = rescale_vae(vae, inputs, headroom)
    fixed.save_pretrained(folder, safe_serialization=True)  # staging: removed with the build if it fails
    source = weight_source("vae", patched.weights["vae"].loader, folder, False)
    reloaded = source.load("fp32")  # what the export stage will read (eps as diffusers sets it)
    records = []
    for part, plan in zip(parts, plans, strict=True):
        before, after = (np.concatenate([_f32_outputs(v, part, x).reshape(-1) for x in inputs[plan.coder]])
                         for v in (vae, reloaded))
        records.append({
            "part": part, "mode": "rescale", "plan": plan.describe(),
            "stream_scale": plan.stream_scale, "conv1_scales": dict(plan.branch_scales),
            "measured_peak": plan.stream_peak, "headroom": headroom,
            "f32_psnr_db_vs_unpatched": _psnr(after, before, part),
        })  # fmt: skip
    patched.originals.setdefault("vae", vae)
    patched.substituted["vae"] = f"{patched.substituted.get('vae', 'base')} rescaled for f16 ({', '.join(parts)})"
    patched.weights["vae"] = source
    patched.pipeline.vae = reloaded
    return records


def _f32_outputs(vae: Any, part: str, x: Any) -> np.ndarray:
    """Decoded images or encoded latent means, one input at a time, in f32."""
    import torch

    with torch.no_grad():
        if part == "vae_decoder":
            return torch.cat([vae.decode(x[i : i + 1]).sample for i in range(x.shape[0])]).numpy()
        return torch.cat([vae.encode(x[i : i + 1]).latent_dist.mean for i in range(x.shape[0])]).numpy()


def _psnr(out: np.ndarray, ref: np.ndarray, part: str) -> float:
    """PSNR as the gate computes it: images over [-1, 1], latents over their own range."""
    from validate.metrics import psnr

    if part == "vae_decoder":
        return psnr(out, ref, 2.0)
    return psnr(out, ref, float(np.ptp(ref)) or 1.0)


def runtime_stage(bundle_dir: Path, recipe: Recipe, patched: Any, exported: list[Any], notify: Progress
                  ) -> tuple[list[Any], list[dict[str, Any]]]:
    """Write or strip ACTIVATIONS_SCALE_FACTOR in the VAE IRs as each part's fp16_fix says; judge `rescale` parts.

    Returns the exported components with their runtime options as now written, and one
    record per runtime-scale / rescale part for the report.
    """
    import openvino as ov

    from convert.export import save_atomically
    from validate.activation_scaling import KEY, choose_factor, judge_factor, runtime_factor, set_runtime_factor

    core = ov.Core()
    done, records = [], []
    for component in exported:
        if component.name not in VAE_PARTS:
            done.append(component)
            continue
        part, mode = component.name, recipe.fp16_fix_for(component.name)
        model = core.read_model(component.xml)
        before = runtime_factor(model)
        explicit = recipe.settings_for(part).runtime_options.get(KEY)
        factor = float(explicit) if explicit is not None else None
        if mode == "runtime-scale":
            notify(f"export: {part}: choosing ACTIVATIONS_SCALE_FACTOR under emulated f16")
            factor, trials = choose_factor(core, model, *_judging(patched, recipe, part))
            records.append({"part": part, "mode": mode, "chosen_factor": factor, "tried": [t.summary() for t in trials]})
        elif mode == "rescale":
            trial = judge_factor(core, model, factor, *_judging(patched, recipe, part))
            records.append({"part": part, "mode": mode, "f16_emulated": trial.summary(),
                            "f16_non_finite": trial.non_finite, "f16_values": trial.total,
                            "f16_psnr_db": trial.psnr_db, "f16_max_abs": trial.max_abs})
        if factor != before:
            set_runtime_factor(model, factor)
            save_atomically(model, component.xml, compress_to_fp16=False)  # weights keep their stored types
            log.info("%s: %s %s -> %s", part, KEY, before, factor)
        options = {k: v for k, v in component.runtime_options.items() if k != KEY}
        done.append(replace(component, runtime_options=options | ({KEY: f"{factor}"} if factor else {})))
        del model
    return done, records


def _judging(patched: Any, recipe: Recipe, part: str) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray],
                                                                 Callable[[np.ndarray, np.ndarray], float], float, float]:
    """What a factor is judged on: the validation photos (small resolution), the unpatched VAE's f32
    outputs for them, PSNR as the gate computes it (encoder: the latent means), and the recipe's margins."""
    import torch

    from validate.inputs import encode_images

    original = patched.originals.get("vae", patched.pipeline.vae)
    batches = [encode_images(original, p) if part == "vae_decoder" else p for p in _photos(recipe, patched)]
    x = [batch[i : i + 1] for batch in batches for i in range(len(batch))]  # full size first: its maxima are reported
    with torch.no_grad():
        if part == "vae_decoder":
            references = [original.decode(torch.from_numpy(xi)).sample.float().numpy() for xi in x]
        else:
            channels = original.config.latent_channels
            references = [original.encode(torch.from_numpy(xi)).latent_dist.parameters[:, :channels].float().numpy()
                          for xi in x]

    def fidelity(out: np.ndarray, ref: np.ndarray) -> float:
        return _psnr(out if part == "vae_decoder" else out[:, : ref.shape[1]], ref, part)

    inputs = [{IN_NAME[part]: xi} for xi in x]
    return inputs, references, fidelity, recipe.validation.min_psnr_db, recipe.validation.min_f16_headroom


def merge_records(patch_records: list[dict[str, Any]], runtime_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per part: the patch stage's plan and fidelity joined with the post-export judgement."""
    merged: dict[str, dict[str, Any]] = {}
    for record in [*patch_records, *runtime_records]:
        merged.setdefault(record["part"], {}).update(record)
    return list(merged.values())
