"""The report's JSON stays strict JSON and its verdict logic cannot be fooled by NaN."""

from __future__ import annotations

import json
import math

from validate.headline import VaeVerdict
from validate.metrics import FiniteCount
from validate.report import CheckResult, ValidationReport


def check(**kw: object) -> CheckResult:
    """A VAE check row; total/nan/posinf/neginf keywords set its counts."""
    counts = {"total": 12, "nan": 0, "posinf": 0, "neginf": 0}
    counts |= {k: kw.pop(k) for k in list(kw) if k in counts}  # type: ignore[misc]
    base = dict(component="vae_decoder", vae="substituted", precision="f16", execution="emulated: no f16 here",
                device="CPU", input_set="images@64", counts=FiniteCount(**counts), psnr_db=55.0)  # type: ignore[arg-type]
    base.update(kw)
    return CheckResult(**base)  # type: ignore[arg-type]


def test_json_is_strict_even_with_infinities() -> None:
    rows = [check(psnr_db=math.inf, max_abs_activation={"decoder.conv_in": 0.0, "decoder.up_blocks.2": 1.7e5})]
    text = json.dumps(ValidationReport(rows, {"max_non_finite": 0, "min_psnr_db": 40}).to_json(), allow_nan=False)
    row = json.loads(text)["checks"][0]
    assert row["psnr_db"] == "inf"
    assert row["f16_headroom"]["decoder.conv_in"] == "inf"
    assert row["f16_headroom"]["decoder.up_blocks.2"] < 1


def test_original_rows_never_gate_and_no_rows_fail() -> None:
    failing_original = check(vae="original", nan=12, psnr_db=None, failures=["x"], gating=False)
    assert ValidationReport([check(), failing_original], {"max_non_finite": 0, "min_psnr_db": 40}).passed
    empty = ValidationReport([failing_original], {"max_non_finite": 0, "min_psnr_db": 40})
    assert not empty.passed and "no validation check ran" in empty.failures[0]


def test_headline_counts_and_markdown() -> None:
    bad = check(nan=10, posinf=1, neginf=1, psnr_db=None, failures=["vae_decoder f16: 12/12 non-finite"])
    report = ValidationReport([bad], {"max_non_finite": 0, "min_psnr_db": 40})
    assert report.headline().vae == {"f16": VaeVerdict(non_finite=12, values=12, min_psnr_db=None)}
    assert report.to_json()["headline"]["f16"] == {"non_finite": 12, "values": 12, "min_psnr_db": None}
    text = report.to_markdown()
    assert "FAILED" in text and "12/12 (10 / 1 / 1)" in text and "vae_decoder f16: 12/12 non-finite" in text


def test_check_rows_keep_flat_counts_in_report_json() -> None:
    """Counts are one FiniteCount in memory; report.json keeps total, nan, posinf, neginf in their old place."""
    row = ValidationReport([check(nan=3, posinf=2)], {"max_non_finite": 0, "min_psnr_db": 40}).to_json()["checks"][0]
    assert list(row)[:12] == ["component", "vae", "precision", "execution", "device", "input_set", "total", "nan",
                              "posinf", "neginf", "psnr_db", "max_abs_activation"]
    assert (row["total"], row["nan"], row["posinf"], row["neginf"], row["invalid"]) == (12, 3, 2, 0, 5)
