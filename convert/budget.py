"""What a build needs in memory and disk, estimated before it starts, and whether this machine has it.

A full-size build that does not fit is OOM-killed or fills the disk after tens of minutes.
The estimate comes from what is known after resolve (metadata only): each component's
parameter count (safetensors headers where the file is on this machine, else file size over
its dtype width), the recipe's weight formats and the gate's resolutions. It models the
peaks measured at full size (BENCHMARKS.md, "Issue 18: the flagship at full size with its own default gate"):

* export: the library process plus the largest component being converted and compressed;
* validate: the library process plus the torch pipeline kept for the reference VAE, plus the
  largest of: one VAE decode at the gate's resolution (f32, emulated and tapped compiles, one
  at a time), and the denoiser compiled for the pipeline run (its weights as the CPU plugin
  holds them at f32, its activations for the guidance batch at the end-to-end resolution).

Pure functions; the machine is read in `available_memory` / `free_disk` only.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.disk import nearest_existing
from convert.quantize_pieces import PIECE_WEIGHT_BYTES
from validate.pieces import piece_resident_bytes

GIB = 1024**3
GB = 1000**3
MEMORY_ENV = "SDXL_CONVERT_MEMORY_GIB"
KEEP_FREE_ENV = "SDXL_CONVERT_KEEP_FREE_GIB"  # convert.disk's reserve, named here for the message

#: The process with torch, OpenVINO, optimum and diffusers imported (the tiny flagship peaks at 1.15 GiB).
LIBRARIES = 1.1 * GIB
#: Bytes of peak RSS per parameter while the largest component is converted and compressed (an
#: export worker process: the mmapped source weights, OpenVINO's graph, NNCF's compressed copy).
EXPORT_PER_PARAM: Mapping[str, float] = {"fp32": 4.6, "fp16": 2.3, "int8": 1.7, "int4": 1.7}
#: Bytes per parameter of the whole pipeline while a single file is read by diffusers and written as a
#: diffusers folder (LoRAs fused): measured 7.22 GiB for the 3.47 B-parameter SDXL file.
MATERIALIZE_PER_PARAM = 1.9
#: Bytes per parameter of a denoiser compiled at f32 by the CPU plugin: int8/int4 weights stay
#: compressed (weight decompression in FullyConnected); f16 weights are expanded to f32, every layer.
#: Measured at full size on an AVX-512 EPYC (2026-12-06): the fp16 SDXL UNet's f32 pipeline run at
#: 1024x1024, batch 2, peaked at 16.1 GiB = the base + its activations + 4.0 B for each of its 2.57 B
#: parameters (an earlier guess kept its Linear weights f16 and said 12.0 GiB). Since then the gate runs
#: a denoiser whose compiled weights exceed `validate.pieces.SPLIT_ABOVE` in pieces: it holds one piece.
RUN_PER_PARAM: Mapping[str, float] = {"fp32": 4.0, "fp16": 4.0, "int8": 1.05, "int4": 0.55}
#: The VAE checks at 1024x1024: the torch f32 reference decode, then the IR's f32, emulated and tapped
#: decodes one at a time. Measured since the taps went first (full-size SDXL VAE, 2026-12-06/07): 5.29 GiB
#: peak for the single file + LoRA build's VAE phase, 5.23 GiB for the fp16-UNet build's (base ~1.9 GiB).
VAE_AT_1024 = 3.4 * GIB
#: Activations of the denoiser at 1024x1024 for the guidance batch of 2 (the emulated f16 run is the
#: larger). Measured: 9.14 GiB peak in the flagship's end-to-end f16 run with its int8 UNet.
DENOISER_AT_1024 = 4.7 * GIB
#: The same for a denoiser run in pieces (validate/pieces.py): only one piece's activations are alive.
#: Measured: the fp16 SDXL UNet in 4 pieces, its emulated f16 replay at 1024x1024, batch 2: 5.94 GiB peak
#: = the base + one piece (2.39 GiB) + 1.65 GiB.
PIECE_ACTIVATIONS_AT_1024 = 1.7 * GIB
#: Bytes per parameter of the whole pipeline the validate stage holds besides its compiled models
#: (the patched torch pipeline's leftovers, the f32 reference VAE, the IRs read): 1.6-1.9 GiB at full size.
VALIDATE_PER_PARAM = 0.25


@dataclass(frozen=True)
class Needs:
    """Estimated peak RSS of the build process (and its export worker) and disk per use."""

    memory: int
    memory_phase: str  # what sets the peak, in words
    disk: dict[str, int] = field(default_factory=dict)  # "downloads", "bundle", "component cache", ...
    assumed: list[str] = field(default_factory=list)  # what the estimate had to guess

    @property
    def disk_total(self) -> int:
        return sum(self.disk.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {gb(n)}" for name, n in self.disk.items() if n)
        return (f"needs about {gib(self.memory)} GiB of memory at peak ({self.memory_phase}) and "
                f"{gb(self.disk_total)} GB of disk ({parts or 'nothing new'})")

    def without(self, use: str) -> Needs:
        """The same build without one disk use (e.g. not storing into the component cache)."""
        return Needs(self.memory, self.memory_phase, {k: (0 if k == use else v) for k, v in self.disk.items()},
                     self.assumed)

    def to_json(self) -> dict[str, Any]:
        return {"peak_memory_gib": round(self.memory / GIB, 2), "memory_phase": self.memory_phase,
                "disk_gb": {k: round(v / GB, 2) for k, v in self.disk.items()},
                "disk_total_gb": round(self.disk_total / GB, 2), "assumed": self.assumed}


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def gb(n: float) -> str:
    return f"{n / GB:.1f}" if n >= 0.05 * GB or n == 0 else "<0.1"


def run_bytes_per_param(weights: str) -> float:
    return RUN_PER_PARAM.get(weights, 4.0)


#: nncf.quantize of a denoiser, bytes of peak RSS per parameter it is given (convert/quantize.py), measured on the
#: full-size SDXL UNet (2.567 B parameters, 4 calibration calls at 256x256) exported at f32 as the quantize stage gets
#: it, quantized whole on the device Xeon (BENCHMARKS.md "Issue 21 on the device Xeon"): hybrid 17.19 GiB, full
#: 36.44 GiB. The quantize stage gives it one piece of at most PIECE_WEIGHT_BYTES of f32 weights at a time
#: (convert/quantize_pieces.py) and holds the int8 pieces done so far (about a byte per parameter): full int8 of the
#: SDXL UNet in 10 pieces peaked at 6.66 GiB on this 2-core EPYC (this formula: 7.3).
QUANTIZE_PER_PARAM: dict[str, float] = {"hybrid": 7.19, "full": 15.24}
QUANTIZED_PER_PARAM = 1.0
#: Quantizing in pieces holds, for every calibration call, the tensors handed on to later pieces: for the SDXL UNet at
#: 1024x1024 with guidance (batch 2) its skip connections, 205 MB at f32 (from its shapes, not measured); 4 calls at
#: 256x256 in the measured run above, 24 at 512x512 by default for sdxl-cpu-int8-hybrid (1.2 GB).
PIECE_CUTS_PER_CALL_AT_1024 = 205e6


def estimate_memory(params: Mapping[str, int], weights: Mapping[str, str], *, denoiser: str,
                    vae_resolution: int, pipeline_resolution: int | None, guidance_batch: int,
                    vae_checked: bool, materialize: bool = False, quantize: str | None = None,
                    calibration: tuple[int, int] = (0, 1024)) -> tuple[int, str]:
    """Peak RSS and the phase that sets it.

    `params` per pipeline folder (unet, vae, text_encoder, ...), `weights` per exported
    component (its recipe weight format); `pipeline_resolution` None: no pipeline run;
    `calibration` (recorded denoiser calls, image side) of a `quantize` run.
    """
    phases: dict[str, float] = {}
    if materialize:
        phases["materialize: the single file read and written as a diffusers folder"] = (
            LIBRARIES + MATERIALIZE_PER_PARAM * sum(params.values()))
    exported = {c: params.get("vae" if c.startswith("vae_") else c, 0) for c in weights}
    if exported:
        largest = max(exported, key=lambda c: exported[c] * EXPORT_PER_PARAM.get(weights[c], 2.3))
        phases[f"export: {largest}"] = LIBRARIES + exported[largest] * EXPORT_PER_PARAM.get(weights[largest], 2.3)
    base = LIBRARIES + VALIDATE_PER_PARAM * sum(params.values())
    if vae_checked:
        phases[f"validate: VAE decode at {vae_resolution}x{vae_resolution}"] = (
            base + VAE_AT_1024 * (vae_resolution / 1024) ** 2)
    if pipeline_resolution:  # every other part compiled alone at f32 (SD3's T5: 4.7 B parameters)
        for part in (p for p in weights if p != denoiser and not p.startswith("vae_")):
            phases[f"validate: {part} compiled at f32"] = base + piece_resident_bytes(
                exported[part] * run_bytes_per_param(weights[part]))
    if pipeline_resolution and denoiser in weights:
        whole = params.get(denoiser, 0) * run_bytes_per_param(weights[denoiser])
        resident = piece_resident_bytes(whole)
        per_image = DENOISER_AT_1024 if resident == whole else PIECE_ACTIVATIONS_AT_1024
        act = per_image * guidance_batch / 2 * (pipeline_resolution / 1024) ** 2
        phases[f"validate: {denoiser} compiled at f32 for {pipeline_resolution}x{pipeline_resolution}, "
               f"batch {guidance_batch}"] = base + resident + act
    if quantize is not None and denoiser in weights:
        count = params.get(denoiser, 0)
        piece = min(count, PIECE_WEIGHT_BYTES // 4)
        calls, side = calibration
        cuts = 0.0 if piece == count else (
            PIECE_CUTS_PER_CALL_AT_1024 * calls * guidance_batch / 2 * (side / 1024) ** 2)
        parts = "" if piece == count else f", in pieces of {piece / 1e6:.0f} M parameters"
        phases[f"quantize: nncf.quantize of {denoiser} ({quantize}{parts})"] = (
            LIBRARIES + QUANTIZE_PER_PARAM[quantize] * piece + QUANTIZED_PER_PARAM * count + cuts)
    if not phases:
        return int(LIBRARIES), "libraries"
    phase = max(phases, key=lambda p: phases[p])
    return int(phases[phase]), phase


def _calibration_calls(recipe: Any, quant: Any, native: int) -> tuple[int, int]:
    """(denoiser calls recorded, image side) of the recipe's calibration run; (0, native) without one."""
    if quant is None:
        return 0, native
    from convert.quantize import calibration_plan

    prompts, steps, side = calibration_plan(recipe, quant, native)
    return len(prompts) * steps, side


def available_memory(environ: Mapping[str, str] = os.environ, proc: Path = Path("/proc")) -> tuple[int, str]:
    """Memory this build may use and where the number comes from.

    $SDXL_CONVERT_MEMORY_GIB if set (a machine with swap, or a deliberate override); else the
    smaller of MemAvailable (RAM not in use, page cache counted as free) plus this process's own
    RSS, and the memory cgroup's limit (a CI runner or container).
    """
    raw = environ.get(MEMORY_ENV, "").strip()
    if raw:
        value = _number(raw)
        if value is None or value <= 0:
            from convert.errors import UsageError

            raise UsageError(f"{MEMORY_ENV}={raw!r} is not a number of GiB above 0", hint="unset it or give e.g. 16")
        return int(value * GIB), MEMORY_ENV
    found: list[tuple[int, str]] = []
    meminfo = _meminfo(proc / "meminfo")
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"] + _own_rss(proc), "available RAM"))
    limit = cgroup_limit(proc)
    if limit is not None:
        found.append((limit, "memory cgroup limit"))
    return min(found) if found else (2**62, "unknown")


def cgroup_limit(proc: Path = Path("/proc"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This process's memory cgroup limit (v1 memory.limit_in_bytes or v2 memory.max), None if unlimited."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        candidates = ([root / "memory" / rel / "memory.limit_in_bytes"] if "memory" in controllers.split(",")
                      else [root / rel / "memory.max"] if controllers == "" else [])
        for file in candidates:
            try:
                text = file.read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:
                return int(text)
    return None


def _meminfo(path: Path) -> dict[str, int]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * 1024
    return out


def _own_rss(proc: Path) -> int:
    return _meminfo(proc / "self" / "status").get("VmRSS", 0)


def _number(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def free_disk(folder: Path) -> tuple[int, int]:
    """(device id, free bytes) of the file system `folder` is on (or would be created on)."""
    existing = nearest_existing(folder)
    return existing.stat().st_dev, shutil.disk_usage(existing).free


# ----------------------------------------------------------------- from a resolution
#: Original-layout (single-file) key prefixes -> pipeline folder; anything else counts as the denoiser.
ORIGINAL_LAYOUT: Mapping[str, str] = {
    "conditioner.embedders.0.": "text_encoder", "conditioner.embedders.1.": "text_encoder_2",
    "cond_stage_model.": "text_encoder", "first_stage_model.": "vae",
}


def _weight_params(path: Path | None, size: int, width: int, denoiser: str,
                   folder: str | None) -> tuple[dict[str, int], bool]:
    """Parameters per folder of one weight file; exact from its header when the file is here."""
    from convert.fetch import DTYPE_BYTES, NotSafetensors, read_safetensors_header

    if path is not None and path.is_file():
        try:
            header = read_safetensors_header(path)
        except (NotSafetensors, OSError):
            header = None
        if header is not None:
            out: dict[str, int] = {}
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                n = (entry["data_offsets"][1] - entry["data_offsets"][0]) // DTYPE_BYTES.get(entry["dtype"], 4)
                target = folder or next((f for p, f in ORIGINAL_LAYOUT.items() if name.startswith(p)), denoiser)
                out[target] = out.get(target, 0) + n
            return out, True
    return {folder or denoiser: size // width}, False


def _on_this_machine(source: Any, f: Any, workspace: Any) -> Path | None:
    """Where a resolved source's file lies here: its local folder, or its blob in the Hub cache (may not exist yet)."""
    from convert.fetch import _blob_path

    if source.local_path is not None:
        return Path(source.local_path) / f.path
    hub = source.source.hub
    return _blob_path(hub.repo, f, workspace.hf_cache) if hub is not None else None


def _native_resolution(resolution: Any, workspace: Any, guessed: list[str]) -> int:
    """The pipeline's native image side (denoiser sample_size x VAE scale), from configs on this machine."""
    from convert.readback import read_json

    family = resolution.recipe.family
    base = next(s for s in resolution.sources if s.role.kind == "base")
    configs = {}
    for folder in (family.denoiser, "vae"):
        f = next((f for f in base.files if f.path == f"{folder}/config.json"), None)
        if f is None:
            continue
        path = _on_this_machine(base, f, workspace)
        try:
            configs[folder] = read_json(path) if path is not None and path.is_file() else {}
        except (OSError, ValueError):
            configs[folder] = {}
    sample = configs.get(family.denoiser, {}).get("sample_size")
    if not isinstance(sample, int):
        guessed.append(f"native resolution 1024 (no {family.denoiser}/config.json on this machine yet)")
        return 1024
    blocks = configs.get("vae", {}).get("block_out_channels")
    return sample * (2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8)


def resolution_needs(resolution: Any, workspace: Any, *, cached: frozenset[str] = frozenset()) -> Needs:
    """Needs of building `resolution` (a convert.resolve.Resolution) into `workspace`.

    `cached`: exported components the component cache already holds (not exported, not stored).
    """
    from convert import disk
    from convert.fetch import source_selection
    from convert.single_file import needs_materializing

    recipe = resolution.recipe
    family = recipe.family
    params: dict[str, int] = {}
    downloads = materialized = 0
    guessed: list[str] = []
    for source in resolution.sources:
        role = source.role
        if role.kind == "lora" or role.kind == "config":
            continue
        hub = source.source.hub
        width = 2 if (source.source.variant or "") in ("fp16", "bf16") else 4
        of_source: dict[str, int] = {}
        for f in source_selection(source, family):
            if not f.path.endswith(".safetensors"):
                continue
            local = _on_this_machine(source, f, workspace)
            if hub is not None and not (local is not None and local.is_file()):
                downloads += f.size
            folder = role.component if role.component else (None if source.source.file else f.path.split("/")[0])
            found, exact = _weight_params(local, f.size, width, family.denoiser, folder)
            if folder is None:
                materialized += f.size
            if not exact:
                guessed.append(f"{role}: {f.path} taken as {'fp16' if width == 2 else 'fp32'} weights")
            for name, n in found.items():
                of_source[name] = of_source.get(name, 0) + n
        params |= of_source  # base first, then each substitute replaces its component
    if not needs_materializing(recipe):
        materialized = 0
    # a denoiser with int8 activations is exported at fp32, its reference compiled at f32 by the gate
    quantized = recipe.quantized()
    weights = {c: "fp32" if c in quantized else recipe.settings_for(c).weights
               for c in family.weighted if recipe.settings_for(c).export}
    v, e2e = recipe.validation, recipe.validation.end_to_end
    native = _native_resolution(resolution, workspace, guessed)
    vae_resolution = v.resolution or native
    pipeline_resolution = (e2e.resolution or v.resolution or native) if e2e.prompts else None
    batch = recipe.guidance_batch()
    vae_checked = any(p.startswith("vae_") and p in weights for p in recipe.gated_components())
    memory, phase = estimate_memory(params, weights, denoiser=family.denoiser, vae_resolution=vae_resolution,
                                    pipeline_resolution=pipeline_resolution, guidance_batch=batch,
                                    vae_checked=vae_checked, materialize=needs_materializing(recipe),
                                    quantize=quantized[family.denoiser].mode if family.denoiser in quantized else None,
                                    calibration=_calibration_calls(recipe, quantized.get(family.denoiser), native))
    bundle = disk.bundle_bytes(params, {c: "fp32+int8" if c in quantized else w for c, w in weights.items()})
    stored = disk.bundle_bytes(params, {c: w for c, w in weights.items() if c not in cached}) - disk.SLACK_BYTES
    needs = {"downloads": downloads, "single file as diffusers": materialized, "bundle": bundle,
             "component cache": max(stored, 0)}
    return Needs(memory, phase, needs, guessed)


# ----------------------------------------------------------------- does it fit
@dataclass(frozen=True)
class Machine:
    """What this machine offers the build: memory and free disk per folder the build writes."""

    memory: int
    memory_source: str
    free: dict[str, int]  # use ("downloads", "bundle", ...) -> free bytes on its file system, reserve deducted
    shares: dict[str, str]  # use -> the first use on the same file system (uses that share one disk add up)
    reserve: int = 0  # $SDXL_CONVERT_KEEP_FREE_GIB, already deducted from `free`

    def to_json(self) -> dict[str, Any]:
        return {"memory_gib": round(self.memory / GIB, 2), "memory_source": self.memory_source,
                "free_disk_gb": {k: round(v / GB, 2) for k, v in self.free.items()}}


def machine_for(folders: Mapping[str, Path], environ: Mapping[str, str] = os.environ) -> Machine:
    """`folders`: use -> folder it writes to (the Hub cache, the artifacts folder, the component cache)."""
    from convert.disk import keep_free_bytes

    memory, source = available_memory(environ)
    keep = keep_free_bytes(environ)
    free: dict[str, int] = {}
    shares: dict[str, str] = {}
    first_on: dict[int, str] = {}
    for use, folder in folders.items():
        device, available = free_disk(folder)
        free[use] = max(available - keep, 0)
        shares[use] = first_on.setdefault(device, use)
    return Machine(memory, source, free, shares, keep)


def shortfalls(needs: Needs, machine: Machine) -> list[str]:
    """What does not fit, one phrase each (empty: it fits)."""
    problems = []
    if needs.memory > machine.memory:
        problems.append(f"about {gib(needs.memory)} GiB of memory at peak ({needs.memory_phase}) but "
                        f"{gib(machine.memory)} GiB {'are allowed by ' + MEMORY_ENV if machine.memory_source == MEMORY_ENV else 'is the ' + machine.memory_source}")
    per_disk: dict[str, int] = {}
    for use, n in needs.disk.items():
        anchor = machine.shares.get(use, use)
        per_disk[anchor] = per_disk.get(anchor, 0) + n
    for anchor, n in per_disk.items():
        if anchor in machine.free and n > machine.free[anchor]:
            uses = [u for u, a in machine.shares.items() if a == anchor and needs.disk.get(u)]
            reserve = f" after the {gib(machine.reserve)} GiB that {KEEP_FREE_ENV} keeps" if machine.reserve else ""
            problems.append(f"about {gb(n)} GB of disk for {' + '.join(uses)} but {gb(machine.free[anchor])} GB are free "
                            f"there{reserve}")
    return problems


FIT_HINT = (f"lower validation.resolution / validation.end_to_end.resolution or use weights: int8 for the denoiser "
            f"(memory), free disk or point --artifacts, --cache, HF_HUB_CACHE elsewhere; set {MEMORY_ENV} "
            f"to the GiB this build may use if the estimate is wrong for this machine (e.g. with swap)")
