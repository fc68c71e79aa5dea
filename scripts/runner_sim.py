"""The scheduled-rebuild runner, simulated: a full-size rebuild inside 14 GiB of memory and on a 14 GB disk.

GitHub's `ubuntu-24.04` hosted runner (what .github/workflows/rebuild.yml runs on) has 16 GB of
RAM, ~2 GB of it taken by the runner itself, and 14 GB of SSD. Here (root, cgroup v1):

* a memory cgroup `/sys/fs/cgroup/memory/<name>` limited to `--memory-gib` (14), swap none:
  the build and everything it starts run inside it, and an OOM kill shows as a failure;
* an ext4 file system of `--disk-gb` (14, in 10^9 bytes) on a loop device, mounted for the run:
  the Hugging Face cache, the artifacts folder and the component cache all live on it, as on
  the runner (the venv does not: on the runner it is on the image's own disk);
* tests/hub_server.py plays the Hub (its storage is outside the small disk): the full-size
  generated input is uploaded as the upstream base repo (fp16 variant) and the full-size
  FP16-fixed VAE as the substitution repo, so the rebuild downloads them for real.

The recipe is `recipes/bench-sdxl-fp16fix-shapes.yaml` (sdxl-fp16fix's exact settings and gate)
with those Hub sources and a `publish:` repo. Steps: a first `rebuild` (build, validate, publish,
tag) and a second one that must be a no-op. Printed: a table per step with pass/fail, wall, peak
RSS (`/usr/bin/time -v`), the cgroup's peak usage and OOM kills, and the peak disk used; the JSON
goes into BENCHMARKS.json under "runner" when `--save` is given (scripts/bench.py renders it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core beside this file

from bench_core import BIN, FULL, GIB, PYTHON, ROOT, measure, stamped  # noqa: E402

GB = 1000**3
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
TOKEN = "hf_dummy_test_token"
RECIPE = ROOT / "recipes" / "bench-sdxl-fp16fix-shapes.yaml"


@dataclass(frozen=True)
class Step:
    label: str
    passed: bool
    status: str
    returncode: int
    wall_s: float
    max_rss_gib: float
    cgroup_peak_gib: float  # memory.max_usage_in_bytes: RSS plus page cache charged to the cgroup
    oom_kills: int
    disk_peak_gb: float  # used bytes on the small file system, above what mkfs left
    disk_end_gb: float
    estimate: dict[str, Any] | None
    log: str


class Cgroup:
    """A cgroup v1 memory group with a hard limit and no swap."""

    def __init__(self, name: str, limit: int) -> None:
        self.path = CGROUP_ROOT / name
        if not CGROUP_ROOT.is_dir():
            raise SystemExit(f"no cgroup v1 memory controller at {CGROUP_ROOT}")
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        for name_, value in (("memory.swappiness", "0"), ("memory.max_usage_in_bytes", "0")):
            try:
                (self.path / name_).write_text(value)
            except OSError:
                pass

    def reset_peak(self) -> None:
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return int((self.path / "memory.failcnt").read_text() != "0")

    def wrap(self, command: list[str]) -> list[str]:
        """`command` started inside the group (the shell joins it, then execs)."""
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *command]

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError as e:
            print(f"runner-sim: could not remove {self.path}: {e}")


class SmallDisk:
    """An ext4 image of `size` bytes, loop-mounted at `mount`."""

    def __init__(self, image: Path, mount: Path, size: int) -> None:
        self.image, self.mount = image, mount
        image.parent.mkdir(parents=True, exist_ok=True)
        image.unlink(missing_ok=True)
        with image.open("wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
        mount.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
        self.baseline = shutil.disk_usage(mount).used

    def used(self) -> int:
        return shutil.disk_usage(self.mount).used - self.baseline

    def remove(self) -> None:
        subprocess.run(["umount", str(self.mount)], check=False)
        self.image.unlink(missing_ok=True)


def _peak_sampler(disk: SmallDisk) -> tuple[threading.Event, list[int], threading.Thread]:
    done, peak = threading.Event(), [0]

    def sample() -> None:
        while not done.wait(1.0):
            peak[0] = max(peak[0], disk.used())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return done, peak, thread


def _recipe(base_repo: str, vae_repo: str, publish_repo: str, folder: Path) -> Path:
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["name"] = "runner-sim-sdxl-fp16fix"
    recipe["base"] = {"hub": {"repo": base_repo, "revision": "main", "variant": "fp16"}, "license": "apache-2.0"}
    recipe["substitutions"]["vae"]["source"] = {"hub": {"repo": vae_repo, "revision": "main"}, "license": "apache-2.0"}
    recipe["publish"] = {"repo": publish_repo, "private": True}
    path = folder / "recipes" / "runner-sim-sdxl-fp16fix.yaml"  # outside recipes/: not a CI rebuild target
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _generated(name: str, out: Path) -> Path:
    if not out.is_dir():
        code = f"from pathlib import Path\nfrom convert.testing import generate\ngenerate({name!r}, Path({str(out)!r}), 0)"
        subprocess.run([PYTHON, "-c", code], check=True, cwd=ROOT)
    return out


def run(args: argparse.Namespace) -> list[Step]:
    work = Path(args.work)
    source = _generated("sdxl-base-shapes", Path(args.input))
    vae = _generated("sdxl-vae-shapes-fp16-fix", work / "vae-fp16-fix")
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ |= {"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    from hub_server import HubServer
    from huggingface_hub import HfApi

    shutil.rmtree(work / "hub", ignore_errors=True)
    hub = HubServer(work / "hub")
    hub.start()
    disk = SmallDisk(work / "disk.img", work / "mnt", int(args.disk_gb * GB))
    group = Cgroup(args.cgroup, int(args.memory_gib * GIB))
    steps: list[Step] = []
    try:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        base_repo, vae_repo = "test-user/sdxl-base-shapes", "test-user/sdxl-vae-shapes-fp16-fix"
        for repo, folder in ((base_repo, source), (vae_repo, vae)):
            api.create_repo(repo)
            api.upload_folder(folder_path=folder, repo_id=repo, commit_message="upstream")
        recipe = _recipe(base_repo, vae_repo, "test-user/runner-sim-sdxl-fp16fix-openvino", work)
        on_disk = disk.mount
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(on_disk / "hf-home"),
               "HF_HUB_CACHE": str(on_disk / "hf-home" / "hub"), "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "0",
               "SDXL_CONVERT_CACHE": str(on_disk / "component-cache")}
        for label in ("first", "noop"):
            group.reset_peak()
            done, peak, sampler = _peak_sampler(disk)
            doc = work / "logs" / f"runner-{label}.json"
            command = [str(BIN / "sdxl-convert"), "rebuild", str(recipe), "--json", "--artifacts", str(on_disk / "artifacts")]
            print(f"runner-sim: {label}: {' '.join(command)}", flush=True)
            m = measure(group.wrap(command), work / "logs" / f"runner-{label}.log", env, stdout=doc)
            done.set()
            sampler.join()
            try:
                outcome = json.loads(doc.read_text())["recipes"][0]
            except (OSError, ValueError, KeyError, IndexError):
                outcome = {"status": "failed", "message": f"no --json document; see {m.log}"}
            status = str(outcome.get("status"))
            expected = "rebuilt" if label == "first" else "skipped"
            steps.append(Step(label, m.returncode == 0 and status == expected and group.oom_kills() == 0, status,
                              m.returncode, round(m.wall_s, 1), round(m.max_rss_gib, 2), round(group.peak() / GIB, 2),
                              group.oom_kills(), round(max(peak[0], disk.used()) / GB, 2), round(disk.used() / GB, 2),
                              outcome.get("estimate"), m.log))
            print(f"runner-sim: {label}: {asdict(steps[-1])}", flush=True)
    finally:
        hub.stop()
        group.remove()
        disk.remove()
        if not args.keep:
            shutil.rmtree(work / "hub", ignore_errors=True)
    return steps


def table(steps: list[Step], memory_gib: float, disk_gb: float) -> list[str]:
    lines = [f"| step | result | status | wall | peak RSS | cgroup peak (of {memory_gib:g} GiB) | OOM kills | "
             f"peak disk (of {disk_gb:g} GB) | disk at the end | estimate (memory / disk) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        est = (f"{s.estimate['peak_memory_gib']} GiB / {s.estimate['disk_total_gb']} GB" if s.estimate else "-")
        lines.append(f"| {s.label} | {'pass' if s.passed else 'FAIL'} | {s.status} | {s.wall_s:.0f} s | {s.max_rss_gib:.2f} GiB | "
                     f"{s.cgroup_peak_gib:.2f} GiB | {s.oom_kills} | {s.disk_peak_gb:.2f} GB | {s.disk_end_gb:.2f} GB | {est} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=str(FULL.bench / "sdxl-base-shapes-seed0"),
                        help="full-size generated base (sdxl-base-shapes, fp16 files); generated if missing")
    parser.add_argument("--work", default=str(FULL.bench / "runner-sim"), help="working folder (hub storage, image, logs)")
    parser.add_argument("--memory-gib", type=float, default=14.0)
    parser.add_argument("--disk-gb", type=float, default=14.0)
    parser.add_argument("--cgroup", default="sdxl-runner-sim")
    parser.add_argument("--keep", action="store_true", help="keep the hub server's storage")
    parser.add_argument("--save", action="store_true", help="merge the result into BENCHMARKS.json")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("runner-sim: needs root (a memory cgroup and a loop mount)", file=sys.stderr)
        return 2
    started = time.monotonic()
    steps = run(args)
    print("\n".join(table(steps, args.memory_gib, args.disk_gb)))
    print(f"runner-sim: {time.monotonic() - started:.0f} s in all")
    if args.save:
        results = json.loads(FULL.results.read_text()) if FULL.results.is_file() else {}
        results["runner"] = stamped({"memory_gib": args.memory_gib, "disk_gb": args.disk_gb,
                                     "steps": [asdict(s) for s in steps]})
        FULL.results.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if steps and all(s.passed for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
