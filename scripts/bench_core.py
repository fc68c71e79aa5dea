"""What every benchmark step shares: where results live, how a process is measured, timestamps.

`Layout` separates the real benchmark (artifacts/bench/, BENCHMARKS.json and BENCHMARKS.md at the
repo root, committed) from the smoke run on the tiny generated pipeline (artifacts/bench-tiny/,
never touching the committed files), so every step can be proven end to end in minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent
GIB = 1024**3


@dataclass(frozen=True)
class Layout:
    """Where one kind of benchmark input is generated, converted and reported."""

    input: str  # "full" | "tiny"
    bench: Path  # working folder (git-ignored)
    results: Path  # the JSON every step merges into
    report: Path  # the markdown rendered from it

    @property
    def source(self) -> Path:
        return self.bench / ("sdxl-base-shapes-seed0" if self.input == "full" else "tiny-sdxl-base-fp16-seed0")

    @property
    def logs(self) -> Path:
        return self.bench / "logs"


FULL = Layout("full", ROOT / "artifacts" / "bench", ROOT / "BENCHMARKS.json", ROOT / "BENCHMARKS.md")
TINY = Layout("tiny", ROOT / "artifacts" / "bench-tiny", ROOT / "artifacts" / "bench-tiny" / "BENCHMARKS.json",
              ROOT / "artifacts" / "bench-tiny" / "BENCHMARKS.md")
LAYOUTS = {"full": FULL, "tiny": TINY}


def now_utc() -> str:
    """The `measured_at` of a result: UTC, to the minute (the granularity of the transcribed seed)."""
    return time.strftime("%Y-%m-%dT%H:%M", time.gmtime())


def stamped(result: dict[str, Any]) -> dict[str, Any]:
    """`result` with the time it was measured, so a partial run merges with older results visibly."""
    return {**result, "measured_at": now_utc()}


# ----------------------------------------------------------------------------- measuring processes


@dataclass(frozen=True)
class Measured:
    """One process run: wall time, peak RSS of its largest process, peak RSS of its whole tree."""

    command: str
    returncode: int
    wall_s: float
    max_rss_gib: float  # /usr/bin/time -v "Maximum resident set size"
    tree_pss_gib: float  # sampled sum of PSS over the process tree (0.25 s; may miss short spikes)
    tree_anon_gib: float  # same, anonymous memory only (not file-backed)
    log: str


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, anonymous PSS) summed over the process tree, in bytes.

    PSS counts a page shared by n processes as 1/n (forked children are not double-counted).
    Anonymous memory is what the kernel cannot give back without swap; the rest of RSS is
    mapped files (mmapped weights), clean pages it can drop and re-read.
    """
    pss = anon = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Pss_Anon:"):
                    anon += int(line.split()[1]) * 1024
        except OSError:
            continue
        todo += _children(p)
    return pss, anon


def measure(command: list[str], log: Path, env: dict[str, str] | None = None, stdout: Path | None = None) -> Measured:
    """Run `command` under /usr/bin/time -v, sampling the RSS of its process tree.

    Output goes to `log`; with `stdout`, the command's stdout goes there alone (e.g. --json).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    timing = log.with_suffix(".time.txt")
    peak = [0, 0]
    with log.open("w") as out, (stdout or Path(os.devnull)).open("w") as doc:
        proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(timing), *command], stdout=doc if stdout else out,
                                stderr=out if stdout else subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                pss, anon = _tree_memory(proc.pid)
                peak[0], peak[1] = max(peak[0], pss), max(peak[1], anon)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        done.set()
        sampler.join()
    wall, rss = parse_time_file(timing)
    return Measured(" ".join(command), proc.returncode, wall, rss, peak[0] / GIB, peak[1] / GIB, str(log))


def _parse_wall(value: str) -> float:
    parts = [float(p) for p in value.strip().split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def folder_bytes(folder: Path, suffixes: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (not suffixes or p.suffix in suffixes))


def parse_time_file(path: Path) -> tuple[float, float]:
    """(wall s, max RSS GiB) from a `/usr/bin/time -v` output file."""
    text = path.read_text()
    wall = _parse_wall(re.search(r"Elapsed \(wall clock\) time.*: (.+)", text).group(1))  # type: ignore[union-attr]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024  # type: ignore[union-attr]
    return wall, rss / GIB


# ----------------------------------------------------------------------------- our converts


def recipe_arg(name: str, lay: Layout, edits: dict[str, str] | None = None) -> str:
    """What to pass `sdxl-convert` for the bench recipe `name`: its name, or a rewritten copy.

    The tiny input gets a copy under its own folder whose paths point at the tiny files (and a
    64-pixel gate); `edits` replaces more text (e.g. the Hub repos of the rebuild step).
    """
    text = (ROOT / "recipes" / f"{name}.yaml").read_text()
    for old, new in (edits or {}).items():
        if old not in text:
            raise SystemExit(f"recipes/{name}.yaml has no {old!r} to replace")
        text = text.replace(old, new)
    if lay.input == "full" and not edits:
        return name
    if lay.input == "tiny":
        text = (text.replace("path: ../artifacts/bench/sdxl-base-shapes-seed0", f"path: {lay.source}")
                .replace("path: ../artifacts/bench/", f"path: {lay.bench}/").replace("resolution: 256", "resolution: 64"))
    path = lay.bench / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def output_of(out: Path, recipe: str | None) -> Path:
    """The bundle a convert wrote under `out` (ours: <recipe>/<build id>/; optimum-cli: `out` itself)."""
    if recipe is not None:
        found = sorted(out.glob(f"{recipe}/*/model_index.json"), key=lambda p: p.stat().st_mtime)
        return found[-1].parent if found else out / "missing"
    return out


def convert_ours(recipe: str, out: Path, log: Path, lay: Layout, edits: dict[str, str] | None = None) -> dict[str, Any]:
    """One `sdxl-convert convert` of a bench recipe under `measure`, into a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    command = [str(BIN / "sdxl-convert"), "--artifacts", str(out), "--cache", str(out / "cache"), "--json", "convert",
               recipe_arg(recipe, lay, edits), "--force"]
    print(f"convert: {' '.join(command)}", flush=True)
    document = log.with_suffix(".json")
    m = measure(command, log, {"HF_HUB_OFFLINE": "1"}, stdout=document)
    return {**asdict(m), **bundle_sizes(output_of(out, recipe)), **stages(document)}


def stages(document: Path) -> dict[str, Any]:
    """Seconds and the process's peak RSS at the end of each stage, from the build's --json (absent: {})."""
    try:
        found = json.loads(document.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(found, dict) or "timings_s" not in found:
        return {}
    return {"stage_s": found["timings_s"], "stage_peak_rss_gib": found.get("peak_rss_gib", {})}


def bundle_sizes(bundle: Path) -> dict[str, Any]:
    return {"bundle": str(bundle), "bundle_bytes": folder_bytes(bundle) if bundle.is_dir() else 0,
            "ir_bytes": folder_bytes(bundle, (".bin", ".xml")) if bundle.is_dir() else 0}
