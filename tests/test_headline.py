"""The validation headline is typed in memory and keeps report.json's shape, in and out."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from convert import package
from convert.build import REPORT, read_headline
from convert.errors import PackageError
from validate.end_to_end import ImageComparison
from validate.headline import EndToEndVerdict, Headline, MalformedHeadline, SubmodelVerdict, VaeVerdict
from validate.metrics import FiniteCount
from validate.report import CheckResult, ValidationReport
from validate.submodels import SubmodelResult

LIMITS = {"max_non_finite": 0, "min_psnr_db": 40}


def _check(nan: int = 0, **kw: object) -> CheckResult:
    row = dict(component="vae_decoder", vae="substituted", precision="f16", execution="emulated: no f16 here",
               device="CPU", input_set="images@64", counts=FiniteCount(12, nan, 0, 0), psnr_db=55.0)
    return CheckResult(**(row | kw))  # type: ignore[arg-type]


def _submodel(component: str, cosine: float | None, failures: list[str]) -> SubmodelResult:
    return SubmodelResult(component, "f16", "emulated: x", "CPU", "2 calls", 2, FiniteCount(100, 0, len(failures), 0),
                          cosine, failures=failures)


def _image(psnr_db: float | None, ssim: float | None) -> ImageComparison:
    return ImageComparison("f16", "a cat", 0, {"unet": "f16 emulated"}, FiniteCount(48, 0, 0, 0), psnr_db, ssim)


def _report() -> ValidationReport:
    checks = [_check(psnr_db=math.inf, max_abs_activation={"decoder.mid": 2.0e4}), _check(input_set="noise", psnr_db=48.123),
              _check(vae="original", nan=12, psnr_db=None, gating=False, failures=["x"]),
              _check(precision="f32", execution="native: f32", psnr_db=90.0)]
    submodels = [_submodel("unet", 0.99, []), _submodel("text_encoder", None, ["te overflowed"])]
    return ValidationReport(checks, LIMITS, submodels=submodels, images=[_image(31.5, 0.91), _image(math.inf, 0.95)])


def test_headline_json_keeps_its_keys_and_order() -> None:
    headline = _report().headline()
    assert headline.vae["f16"] == VaeVerdict(non_finite=0, values=24, min_psnr_db=48.12)
    assert headline.original_vae == {"f16": VaeVerdict(12, 12, None)}
    assert headline.submodels == {"f16": SubmodelVerdict(1, 200, None, ("text_encoder",))}
    assert headline.end_to_end == {"f16": EndToEndVerdict(0, 96, 31.5, 0.91)}
    assert headline.to_json() == {
        "passed": False,
        "f16": {"non_finite": 0, "values": 24, "min_psnr_db": 48.12},
        "original_vae_f16": {"non_finite": 12, "values": 12, "min_psnr_db": None},
        "f32": {"non_finite": 0, "values": 12, "min_psnr_db": 90.0},
        "max_abs_activation": 2.0e4,
        "f16_headroom": 3.275,
        "execution": ["emulated"],
        "submodels": {"f16": {"non_finite": 1, "values": 200, "min_cosine": None, "failed": ["text_encoder"]}},
        "end_to_end": {"f16": {"non_finite": 0, "values": 96, "min_psnr_db": 31.5, "min_ssim": 0.91}},
    }
    assert list(headline.to_json()) == ["passed", "f16", "original_vae_f16", "f32", "max_abs_activation", "f16_headroom",
                                        "execution", "submodels", "end_to_end"]


def test_the_cpu_the_gate_ran_on_is_in_the_headline_and_reads_back() -> None:
    """Issue 17: report.json, the card and --json say which ISA judged the build; older reports lack it."""
    report = _report()
    report.cpu = "AVX2 (16 vector registers)"
    written = json.loads(json.dumps(report.to_json()))["headline"]
    assert written["cpu"] == "AVX2 (16 vector registers)"
    assert Headline.from_json(written).cpu == "AVX2 (16 vector registers)"
    assert "The gate ran on a CPU with AVX2 (16 vector registers)." in report.to_markdown()
    assert Headline.from_json(_report().headline().to_json()).cpu is None


def test_report_json_headline_reads_back_equal_even_with_infinity() -> None:
    report = ValidationReport([_check(psnr_db=math.inf)], LIMITS)
    written = json.loads(json.dumps(report.to_json(), allow_nan=False))["headline"]
    assert written["f16"]["min_psnr_db"] == "inf"  # report.json spells it so
    assert "submodels" not in written and "max_abs_activation" not in written  # absent parts stay absent
    assert Headline.from_json(written) == report.headline()
    full = json.loads(json.dumps(_report().to_json()))["headline"]
    assert Headline.from_json(full) == _report().headline()


@pytest.mark.parametrize(("change", "message"), [
    (lambda h: h["f16"].update(values="12"), "headline.f16.values: expected an integer, got '12'"),
    (lambda h: h["f16"].pop("min_psnr_db"), "headline.f16.min_psnr_db: missing"),
    (lambda h: h.update(f64={}), "headline.f64: not a key this tool writes"),
    (lambda h: h.pop("passed"), "headline.passed: missing"),
    (lambda h: h["submodels"].update(f8={}), "headline.submodels.f8: not a precision (f32, f16, bf16)"),
    (lambda h: h["end_to_end"]["f16"].update(min_ssim=[1]), "headline.end_to_end.f16.min_ssim: expected a number or null, got [1]"),
    (lambda h: h.pop("f16_headroom"), "headline: max_abs_activation and f16_headroom come together or not at all"),
    (lambda h: h.update(cpu=16), "headline.cpu: expected a string, got 16"),
])
def test_a_malformed_headline_is_refused_naming_the_key(change, message: str) -> None:
    data = _report().headline().to_json()
    change(data)
    with pytest.raises(MalformedHeadline) as info:
        Headline.from_json(data)
    assert str(info.value) == message


def test_a_reused_bundle_with_an_unreadable_report_fails_in_one_line(tiny_build, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_build.bundle, copy)
    assert read_headline(copy) == tiny_build.headline
    report = json.loads((copy / REPORT).read_text())
    report["headline"]["f16"]["non_finite"] = "none"
    (copy / REPORT).write_text(json.dumps(report))
    with pytest.raises(PackageError) as info:
        read_headline(copy)
    assert info.value.exit_code == 7
    assert str(info.value) == (f"{copy}: validation/report.json cannot be read back: headline.f16.non_finite: "
                               "expected an integer, got 'none'; rebuild the bundle with `convert --force`")
    (copy / REPORT).write_text("{not json")
    with pytest.raises(PackageError, match=r"report.json cannot be read back: Expecting property name"):
        read_headline(copy)
    (copy / REPORT).write_text("{}")
    with pytest.raises(PackageError, match=r"report.json cannot be read back: headline: missing;"):
        read_headline(copy)


def test_a_build_names_the_cpu_its_gate_ran_on(tiny_build) -> None:  # type: ignore[no-untyped-def]
    from validate.host import cpu_isa

    assert tiny_build.headline is not None and tiny_build.headline.cpu == cpu_isa().describe()
    assert read_headline(tiny_build.bundle).cpu == cpu_isa().describe()
    assert tiny_build.to_json()["validation"]["cpu"] == cpu_isa().describe()


def test_card_metadata_quotes_the_headline_json(tiny_build) -> None:
    import yaml

    front = yaml.safe_load((tiny_build.bundle / package.CARD).read_text().split("---")[1])
    assert front["validation"] == tiny_build.headline.to_json()


def test_submodel_and_image_rows_keep_flat_counts_in_report_json() -> None:
    submodel = _report().to_json()["submodels"][1]
    assert list(submodel)[:10] == ["component", "precision", "execution", "device", "inputs", "calls", "total", "nan",
                                   "posinf", "neginf"]
    assert (submodel["total"], submodel["posinf"], submodel["invalid"]) == (100, 1, 1)
    image = _report().to_json()["end_to_end"]["images"][0]
    assert list(image)[:9] == ["precision", "prompt", "seed", "runs_as", "total", "nan", "posinf", "neginf", "psnr_db"]
