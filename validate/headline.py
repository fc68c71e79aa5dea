"""The validation headline: the few verdicts the model card, the Hub metadata and the CLI summary quote.

Typed records in memory. `to_json` writes, and `from_json` reads back, the shape that
report.json, the card's `validation:` metadata and `--json` have always held (one key per
precision, `f16`, `original_vae_f16`, ...), so old reports stay readable and readers of new
ones see no change. A reused bundle's headline comes back through `from_json`: a report this
tool cannot read is refused (MalformedHeadline), not half-understood.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

from convert.recipe import Precision

if TYPE_CHECKING:
    from validate.end_to_end import ImageComparison
    from validate.submodels import SubmodelResult

PRECISIONS: tuple[str, ...] = get_args(Precision)
ORIGINAL = "original_vae_"


class MalformedHeadline(ValueError):
    """A headline read back from JSON does not have the shape `Headline.to_json` writes; says where."""


@dataclass(frozen=True)
class VaeVerdict:
    """The worst of one precision's VAE checks."""

    non_finite: int
    values: int
    min_psnr_db: float | None  # None: some check decoded a non-finite value

    def to_json(self) -> dict[str, Any]:
        return {"non_finite": self.non_finite, "values": self.values, "min_psnr_db": self.min_psnr_db}

    @classmethod
    def from_json(cls, data: Any, where: str) -> VaeVerdict:
        row = _object(data, where, ("non_finite", "values", "min_psnr_db"))
        return cls(_int(row, "non_finite", where), _int(row, "values", where), _number(row, "min_psnr_db", where))


@dataclass(frozen=True)
class SubmodelVerdict:
    """The worst of one precision's submodel checks (text encoders, denoiser on captured inputs)."""

    non_finite: int
    values: int
    min_cosine: float | None  # None: some output was non-finite
    failed: tuple[str, ...]  # components that failed, sorted

    def to_json(self) -> dict[str, Any]:
        return {"non_finite": self.non_finite, "values": self.values, "min_cosine": self.min_cosine,
                "failed": list(self.failed)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> SubmodelVerdict:
        row = _object(data, where, ("non_finite", "values", "min_cosine", "failed"))
        failed = row["failed"]
        if not isinstance(failed, list) or not all(isinstance(c, str) for c in failed):
            raise MalformedHeadline(f"{where}.failed: expected a list of component names, got {failed!r}")
        return cls(_int(row, "non_finite", where), _int(row, "values", where), _number(row, "min_cosine", where),
                   tuple(failed))


@dataclass(frozen=True)
class EndToEndVerdict:
    """The worst of one precision's generated images against the f32 pipeline's."""

    non_finite: int
    values: int
    min_psnr_db: float | None
    min_ssim: float | None

    def to_json(self) -> dict[str, Any]:
        return {"non_finite": self.non_finite, "values": self.values, "min_psnr_db": self.min_psnr_db,
                "min_ssim": self.min_ssim}

    @classmethod
    def from_json(cls, data: Any, where: str) -> EndToEndVerdict:
        row = _object(data, where, ("non_finite", "values", "min_psnr_db", "min_ssim"))
        return cls(_int(row, "non_finite", where), _int(row, "values", where), _number(row, "min_psnr_db", where),
                   _number(row, "min_ssim", where))


@dataclass(frozen=True)
class Headline:
    passed: bool
    vae: Mapping[str, VaeVerdict] = field(default_factory=dict)  # precision -> the VAE that ships (gating)
    original_vae: Mapping[str, VaeVerdict] = field(default_factory=dict)  # precision -> the original, for comparison
    max_abs_activation: float | None = None  # None: no activation was measured (then no f16_headroom either)
    f16_headroom: float | None = None  # 65504 / max_abs_activation; None when that maximum is 0
    execution: tuple[str, ...] = ()  # how half precision ran: native / emulated
    submodels: Mapping[str, SubmodelVerdict] = field(default_factory=dict)
    end_to_end: Mapping[str, EndToEndVerdict] = field(default_factory=dict)
    cpu: str | None = None  # the CPU ISA the gate ran on (validate.host); None in reports from before it was recorded
    not_checked: tuple[str, ...] = ()  # gate parts the recipe switched off, in words

    def to_json(self) -> dict[str, Any]:
        """Numbers as computed (an exact match is float inf); report.json spells inf as "inf" itself."""
        out: dict[str, Any] = {"passed": self.passed}
        for precision in sorted(self.vae.keys() | self.original_vae.keys()):
            if precision in self.vae:
                out[precision] = self.vae[precision].to_json()
            if precision in self.original_vae:
                out[f"{ORIGINAL}{precision}"] = self.original_vae[precision].to_json()
        if self.max_abs_activation is not None:
            out["max_abs_activation"] = self.max_abs_activation
            out["f16_headroom"] = self.f16_headroom
        out["execution"] = list(self.execution)
        if self.cpu is not None:
            out["cpu"] = self.cpu
        if self.submodels:
            out["submodels"] = {p: v.to_json() for p, v in self.submodels.items()}
        if self.end_to_end:
            out["end_to_end"] = {p: v.to_json() for p, v in self.end_to_end.items()}
        if self.not_checked:
            out["not_checked"] = list(self.not_checked)
        return out

    @classmethod
    def from_json(cls, data: Any) -> Headline:
        """The inverse of `to_json` (also for report.json's "inf"); MalformedHeadline names the first bad key."""
        if not isinstance(data, dict):
            raise MalformedHeadline(f"headline: expected an object, got {type(data).__name__}")
        vae: dict[str, VaeVerdict] = {}
        original: dict[str, VaeVerdict] = {}
        for key, value in data.items():
            if key in PRECISIONS:
                vae[key] = VaeVerdict.from_json(value, f"headline.{key}")
            elif key.startswith(ORIGINAL) and key[len(ORIGINAL):] in PRECISIONS:
                original[key[len(ORIGINAL):]] = VaeVerdict.from_json(value, f"headline.{key}")
            elif key not in _KEYS:
                raise MalformedHeadline(f"headline.{key}: not a key this tool writes")
        for key in ("passed", "execution"):
            if key not in data:
                raise MalformedHeadline(f"headline.{key}: missing")
        if not isinstance(data["passed"], bool):
            raise MalformedHeadline(f"headline.passed: expected true or false, got {data['passed']!r}")
        if ("max_abs_activation" in data) != ("f16_headroom" in data):
            raise MalformedHeadline("headline: max_abs_activation and f16_headroom come together or not at all")
        execution = data["execution"]
        if not isinstance(execution, list) or not all(isinstance(e, str) for e in execution):
            raise MalformedHeadline(f"headline.execution: expected a list of strings, got {execution!r}")
        cpu = data.get("cpu")
        if cpu is not None and not isinstance(cpu, str):
            raise MalformedHeadline(f"headline.cpu: expected a string, got {cpu!r}")
        not_checked = data.get("not_checked", [])
        if not isinstance(not_checked, list) or not all(isinstance(n, str) for n in not_checked):
            raise MalformedHeadline(f"headline.not_checked: expected a list of strings, got {not_checked!r}")
        return cls(
            cpu=cpu,
            not_checked=tuple(not_checked),
            passed=data["passed"],
            vae=vae,
            original_vae=original,
            max_abs_activation=_number(data, "max_abs_activation", "headline", required=False),
            f16_headroom=_number(data, "f16_headroom", "headline", required=False),
            execution=tuple(execution),
            submodels={p: SubmodelVerdict.from_json(v, f"headline.submodels.{p}")
                       for p, v in _precisions(data, "submodels").items()},
            end_to_end={p: EndToEndVerdict.from_json(v, f"headline.end_to_end.{p}")
                        for p, v in _precisions(data, "end_to_end").items()},
        )


_KEYS = ("passed", "max_abs_activation", "f16_headroom", "execution", "submodels", "end_to_end", "cpu", "not_checked")


def vae_verdict(values: int, non_finite: int, psnrs: Sequence[float | None]) -> VaeVerdict:
    """Worst PSNR of the checks, or None as soon as one of them has none (a non-finite decode)."""
    known = [p for p in psnrs if p is not None]
    return VaeVerdict(non_finite, values, round(min(known), 2) if known and len(known) == len(psnrs) else None)


def submodel_verdicts(results: Sequence[SubmodelResult]) -> dict[str, SubmodelVerdict]:
    out = {}
    for precision in sorted({r.precision for r in results}):
        rows = [r for r in results if r.precision == precision]
        cosines = [r.min_cosine for r in rows]
        out[precision] = SubmodelVerdict(
            non_finite=sum(r.invalid for r in rows), values=sum(r.total for r in rows),
            min_cosine=None if None in cosines else min(c for c in cosines if c is not None),
            failed=tuple(sorted({r.component for r in rows if not r.passed})),
        )
    return out


def end_to_end_verdicts(images: Sequence[ImageComparison]) -> dict[str, EndToEndVerdict]:
    out = {}
    for precision in sorted({r.precision for r in images}):
        rows = [r for r in images if r.precision == precision]
        psnrs, ssims = [r.psnr_db for r in rows], [r.ssim for r in rows]
        out[precision] = EndToEndVerdict(
            non_finite=sum(r.invalid for r in rows), values=sum(r.total for r in rows),
            min_psnr_db=None if None in psnrs else min(p for p in psnrs if p is not None),
            min_ssim=None if None in ssims else min(s for s in ssims if s is not None),
        )
    return out


def _object(data: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise MalformedHeadline(f"{where}: expected an object, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise MalformedHeadline(f"{where}.{missing[0]}: missing")
    extra = [k for k in data if k not in keys]
    if extra:
        raise MalformedHeadline(f"{where}.{extra[0]}: not a key this tool writes")
    return data


def _precisions(data: dict[str, Any], key: str) -> dict[str, Any]:
    rows = data.get(key, {})
    if not isinstance(rows, dict):
        raise MalformedHeadline(f"headline.{key}: expected an object, got {type(rows).__name__}")
    for precision in rows:
        if precision not in PRECISIONS:
            raise MalformedHeadline(f"headline.{key}.{precision}: not a precision ({', '.join(PRECISIONS)})")
    return rows


def _int(row: dict[str, Any], key: str, where: str) -> int:
    value = row[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedHeadline(f"{where}.{key}: expected an integer, got {value!r}")
    return value


def _number(row: dict[str, Any], key: str, where: str, *, required: bool = True) -> float | None:
    """A float or null; report.json writes an infinite value as the string "inf" (validate.report._jsonable)."""
    if key not in row:
        if required:
            raise MalformedHeadline(f"{where}.{key}: missing")
        return None
    value = row[key]
    if value is None:
        return None
    if value == "inf":
        return math.inf
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise MalformedHeadline(f"{where}.{key}: expected a number or null, got {value!r}")
    return value
