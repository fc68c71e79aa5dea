"""The validation report: JSON a machine checks, Markdown and PNGs a person reads."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from validate.end_to_end import ImageComparison, Thresholds
from validate.end_to_end import markdown as image_markdown
from validate.headline import Headline, VaeVerdict, end_to_end_verdicts, submodel_verdicts, vae_verdict
from validate.metrics import Counted, FiniteCount, flat_counts
from validate.submodels import SubmodelResult
from validate.submodels import markdown as submodel_markdown

F16_MAX = 65504.0


@dataclass(frozen=True)
class CheckResult(Counted):
    component: str  # vae_decoder / vae_encoder
    vae: str  # "substituted" (what ships) or "original" (for comparison; never gates)
    precision: str  # f32 / f16 / bf16
    execution: str  # "native" or "emulated", with the reason
    device: str
    input_set: str
    counts: FiniteCount
    psnr_db: float | None  # None: non-finite output (never a number that could pass a `<` test)
    max_abs_activation: dict[str, float] = field(default_factory=dict)  # per block, f32 run
    failures: list[str] = field(default_factory=list)
    gating: bool = True

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return flat_counts(asdict(self)) | {"invalid": self.invalid, "passed": self.passed, "f16_headroom": _headrooms(self)}

    def label(self) -> str:
        return f"{self.component} {self.precision} [{self.vae}, {self.input_set}]"


@dataclass
class ValidationReport:
    checks: list[CheckResult]
    thresholds: dict[str, float]
    fit_checks: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)  # input set name -> description
    samples: dict[str, str] = field(default_factory=dict)  # png name -> caption
    fp16_fixes: list[dict[str, Any]] = field(default_factory=list)  # per VAE part: fp16_fix mode and its numbers
    submodels: list[SubmodelResult] = field(default_factory=list)  # text encoders, UNet (validate/submodels.py)
    images: list[ImageComparison] = field(default_factory=list)  # end to end (validate/end_to_end.py)
    image_limits: Thresholds | None = None
    figures: dict[str, str] = field(default_factory=dict)  # grid and headroom charts: png name -> caption
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part of the gate
    cpu: str | None = None  # the CPU ISA the gate ran on, e.g. "AVX2 (16 vector registers)"
    not_checked: list[str] = field(default_factory=list)  # gate parts the recipe switched off, in words
    quantized: list[dict[str, Any]] = field(default_factory=list)  # int8-activation parts and their calibration

    @property
    def gating_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if c.gating]

    @property
    def passed(self) -> bool:
        return (bool(self.gating_checks) and all(c.passed for c in self.gating_checks)
                and all(r.passed for r in self.submodels) and all(r.passed for r in self.images if r.gating))

    @property
    def failures(self) -> list[str]:
        lines = [f for c in self.gating_checks for f in c.failures]
        lines += [f for r in self.submodels for f in r.failures]
        lines += [f for r in self.images if r.gating for f in r.failures]
        if not self.gating_checks and (self.submodels or any(r.gating for r in self.images)):
            lines.append("no VAE check ran, and a bundle passes only with one: list the VAE's parts in "
                         "validation.components")
        elif not self.gating_checks:
            lines.append("no validation check ran; enable validation.components in the recipe")
        return lines

    def headline(self) -> Headline:
        """The few numbers quoted in the model card, the Hub metadata and the CLI summary."""
        def worst(checks: list[CheckResult]) -> VaeVerdict:
            return vae_verdict(sum(c.total for c in checks), sum(c.invalid for c in checks), [c.psnr_db for c in checks])

        precisions = sorted({c.precision for c in self.checks})
        shipped = {p: [c for c in self.gating_checks if c.precision == p] for p in precisions}
        original = {p: [c for c in self.checks if c.vae == "original" and c.precision == p] for p in precisions}
        activations = [v for c in self.gating_checks for v in c.max_abs_activation.values()]
        peak = max(activations) if activations else None
        return Headline(
            passed=self.passed,
            vae={p: worst(checks) for p, checks in shipped.items() if checks},
            original_vae={p: worst(checks) for p, checks in original.items() if checks},
            max_abs_activation=None if peak is None else float(peak),
            f16_headroom=round(F16_MAX / peak, 3) if peak is not None and peak > 0 else None,
            execution=tuple(sorted({c.execution.split(":")[0] for c in self.checks if c.precision != "f32"})),
            submodels=submodel_verdicts(self.submodels),
            end_to_end=end_to_end_verdicts(self.images),
            cpu=self.cpu,
            not_checked=tuple(self.not_checked),
        )

    def to_json(self) -> dict[str, Any]:
        return _jsonable({
            "passed": self.passed,
            "headline": self.headline().to_json(),
            "thresholds": self.thresholds,
            "failures": self.failures,
            "fit_checks": self.fit_checks,
            "inputs": self.inputs,
            "checks": [c.to_json() for c in self.checks],
            "samples": self.samples,
            "fp16_fixes": self.fp16_fixes,
            "quantization": self.quantized,
            "submodels": [r.to_json() for r in self.submodels],
            "end_to_end": {"thresholds": asdict(self.image_limits) if self.image_limits else None,
                           "images": [r.to_json() for r in self.images]},
            "figures": self.figures,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
        })

    def to_markdown(self, image_dir: str = ".") -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"**Validation {verdict}** (gate: at most {int(self.thresholds['max_non_finite'])} non-finite values, "
            f"PSNR >= {self.thresholds['min_psnr_db']:g} dB vs the original VAE's f32 decode).",
            "",
            "| component | VAE | precision | run as | input | invalid (NaN / +inf / -inf) | PSNR dB | max abs act. | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.checks:
            act = max(c.max_abs_activation.values()) if c.max_abs_activation else None
            verdict_cell = ("pass" if c.passed else "FAIL") if c.gating else ("(info) " + ("ok" if c.passed else "would fail"))
            lines.append(
                f"| {c.component} | {c.vae} | {c.precision} | {c.execution.split(':')[0]} | {c.input_set} | "
                f"{c.invalid}/{c.total} ({c.nan} / {c.posinf} / {c.neginf}) | {_fmt(c.psnr_db)} | "
                f"{_fmt(act, '.3g')} | {verdict_cell} |"
            )
        tapped = [c for c in self.checks if c.max_abs_activation]
        if tapped:
            lines += ["", "Max |activation| per block (f32 run) and f16 headroom (65504 / max; below 1 overflows):", "",
                      "| component | VAE | block | max abs | headroom |", "|---|---|---|---|---|"]
            for c in tapped:
                for block, value in c.max_abs_activation.items():
                    lines.append(f"| {c.component} | {c.vae} | {block} | {_fmt(value, '.4g')} | "
                                 f"{_fmt(_headrooms(c)[block], '.3g')} |")
        if self.fp16_fixes:
            lines += ["", "FP16 fixes:", ""] + [f"- {_describe_fix(f)}" for f in self.fp16_fixes]
        if self.quantized:
            lines += ["", "Quantized (int8 weights and activations; judged against the unquantized IR):", ""]
            lines += [f"- {q['part']}: {q['mode']}, calibrated on {q['samples']} denoiser calls recorded from an f32 run "
                      f"of {q['prompts']} prompt(s), {q['steps']} steps at {q['size']}x{q['size']} ({q['seconds']} s)"
                      for q in self.quantized]
        lines += submodel_markdown(self.submodels) + image_markdown(self.images, self.image_limits)
        if self.failures:
            lines += ["", "Failures:", ""] + [f"- {f}" for f in self.failures]
        if self.not_checked:
            lines += ["", "Not checked (switched off by the recipe):", ""] + [f"- {n}" for n in self.not_checked]
        if self.inputs:
            lines += ["", "Inputs:", ""] + [f"- `{k}`: {v}" for k, v in self.inputs.items()]
        modes = sorted({c.execution for c in self.checks if c.precision != "f32"})
        if modes:
            lines += ["", "How half precision ran:", ""] + [f"- {m}" for m in modes]
        if self.cpu:
            lines += ["", f"The gate ran on a CPU with {self.cpu}."]
        if self.samples:
            lines += [""] + [f"![{cap}]({image_dir}/{name})" for name, cap in self.samples.items()]
        if self.figures:
            lines += [""] + [f"![{cap}]({image_dir}/{name})" for name, cap in self.figures.items()]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        (folder / "report.md").write_text("# Validation report\n\n" + self.to_markdown())


def _describe_fix(fix: dict[str, Any]) -> str:
    """One line per VAE part: what fp16_fix did and the numbers that justify it."""
    head = f"{fix['part']}: {fix['mode']}"
    if fix["mode"] == "runtime-scale":
        chosen = fix.get("chosen_factor")
        tried = "; ".join(fix.get("tried", []))
        return f"{head}: ACTIVATIONS_SCALE_FACTOR {chosen if chosen else 'none passed'} (tried {tried})"
    if fix["mode"] == "rescale":
        return (f"{head}: {fix.get('plan', '')}; f32 PSNR vs unpatched VAE {_fmt(fix.get('f32_psnr_db_vs_unpatched'))} dB; "
                f"emulated f16 {fix.get('f16_emulated', 'not judged')}")
    return head


def _headrooms(check: CheckResult) -> dict[str, float]:
    from validate.metrics import headroom

    return {block: headroom(value) for block, value in check.max_abs_activation.items()}


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: an exact match (PSNR inf) is written as the string "inf"."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return "inf" if isinstance(v, float) and math.isinf(v) else v

    return clean(row)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return format(value, spec)


def save_png(images: np.ndarray, path: Path) -> None:
    """[N,3,H,W] in [-1,1] side by side; non-finite pixels shown magenta so a NaN decode is visible."""
    from PIL import Image

    tiles = []
    for image in images:
        hwc = np.transpose(image, (1, 2, 0))
        bad = ~np.isfinite(hwc).all(axis=-1)
        rgb = ((np.clip(np.nan_to_num(hwc, nan=0.0, posinf=1.0, neginf=-1.0), -1, 1) + 1) * 127.5).round().astype(np.uint8)
        rgb[bad] = (255, 0, 255)
        tiles.append(rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)

