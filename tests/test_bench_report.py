"""The benchmark report: BENCHMARKS.md is what scripts/bench.py renders from BENCHMARKS.json, and older rows say so.

No measurement runs here (`just bench` measures); this checks that the committed files agree,
so a hand edit of BENCHMARKS.md, or a results file that lost a table, shows up in the suite.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402


def _results() -> dict[str, Any]:
    return json.loads((ROOT / "BENCHMARKS.json").read_text())


def test_benchmarks_md_is_rendered_from_benchmarks_json() -> None:
    assert bench.render(_results()) == (ROOT / "BENCHMARKS.md").read_text()


def test_every_stored_result_says_when_it_was_measured() -> None:
    results = _results()
    rows = [*results["convert"].values(), *results["speed"].values(), results["source"], results["parity_run"],
            *results.get("notes", {}).values()]
    assert rows and all(len(row["measured_at"]) == len("2026-11-26T17:55") for row in rows)


def test_a_partial_run_footnotes_the_rows_of_an_earlier_day() -> None:
    results = copy.deepcopy(_results())
    results["date"] = "2026-12-05T10:00"
    for run, row in results["convert"].items():  # every row from an earlier run, then one measured today
        row |= {"measured_at": "2026-11-26T17:55", "transcribed": "from BENCHMARKS.md of 2026-11-26"}
    results["convert"]["ours-fp16"] |= {"measured_at": "2026-12-05T09:58", "wall_s": 94, "returncode": 0}
    del results["convert"]["ours-fp16"]["transcribed"]
    text = bench.render(results)
    assert ("Measured (UTC): optimum-fp16, ours-int8, optimum-int8 on 2026-11-26 (from BENCHMARKS.md of 2026-11-26); "
            "ours-fp16 on 2026-12-05.") in text
    assert "| ours-fp16 | all fp16 | 0 | 94 s |" in text  # the new row itself renders like any other


def test_the_device_sections_are_rendered_from_their_stored_runs() -> None:
    """The device machine's sections (scripts/device_quant.py, device_optimum.py) re-render from the RESULT lines
    kept in BENCHMARKS.json, so their prose and numbers cannot drift apart by hand."""
    import device_optimum
    import device_quant

    notes = _results()["notes"]
    assert device_quant.render(notes["issue21-device"]["data"]) == notes["issue21-device"]["markdown"]
    assert device_quant.render_pieces(notes["issue21-pieces"]["data"]) == notes["issue21-pieces"]["markdown"]
    assert device_optimum.render(notes["issue21-optimum"]["data"]) == notes["issue21-optimum"]["markdown"]
    hybrid = notes["issue21-optimum-hybrid"]
    assert device_optimum.render_hybrid(hybrid["data"]) == hybrid["markdown"]
