"""Full-size SDXL benchmarks: our convert against optimum-cli, bundle speed, the gate, single files, rebuilds.

On the same generated input folder (sdxl-base-shapes, fp16 files, built once into
artifacts/bench/ and reused), the steps (`--steps`, in this order) are:

1. source: generate that input (its peak RSS is a result of its own);
2. convert: each run its own process under `/usr/bin/time -v` (wall time, peak RSS of the
   largest process) while a sampler adds up the PSS of the whole process tree every 0.25 s
   (the honest number if a tool spawns helpers; PSS so forked children are not double-counted):
   ours and optimum-cli at all-fp16, ours (int8 UNet + fp16 rest) and optimum-cli
   `--weight-format int8` (int8 everywhere: the CLI has no per-submodel option);
3. speed, each its own process: the UNet step of both int8 bundles at a 128x128 latent, the
   VAE decode of both fp16 bundles at 1024x1024 at f32 and at emulated f16
   (validate/precision.py), which is also issue 3's line (the VAE is overflow-prone);
4. parity: our submodels against optimum-cli's on the same inputs;
5. gate (issue 11): the gate's cost per submodel, f32 vs emulated f16, on inputs captured by
   the gate's own pipeline run (scripts/bench_extra.py);
6. single-file (issue 10): the same weights as one original-layout file, converted, against
   the diffusers-layout ours-fp16 convert (time, memory, byte-identical IR or output diff);
7. rebuild (issue 12): first, no-op and VAE-only `rebuild` against tests/hub_server.py.

Results merge into BENCHMARKS.json (committed; each result carries `measured_at`, UTC), so a
partial run (`--steps`, `--runs`) keeps earlier results and the report says which rows are
older; BENCHMARKS.md is rendered from it (`--render-only` re-renders without running
anything). Measurements are never retried or trimmed: a failed run is reported as failed.
`--input tiny` runs the same steps on the tiny pipeline into artifacts/bench-tiny/ (a smoke
test of the script, minutes; never touches BENCHMARKS.*). Only one heavy process runs at a
time: this machine is shared.
"""


from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core / bench_extra beside this file

import bench_extra  # noqa: E402
from bench_core import (  # noqa: E402
    BIN, FULL, GIB, LAYOUTS, PYTHON, Layout, bundle_sizes, convert_ours, folder_bytes, measure, output_of, parse_time_file, stamped,
)

SCALING_FACTOR = 0.13025

CONVERTS: dict[str, dict[str, Any]] = {
    "ours-fp16": {"tool": "ours", "recipe": "bench-sdxl-shapes-fp16", "weights": "all fp16"},
    "optimum-fp16": {"tool": "optimum-cli", "args": ["--weight-format", "fp16"], "weights": "all fp16"},
    "ours-int8": {"tool": "ours", "recipe": "bench-sdxl-shapes", "weights": "UNet int8_asym, rest fp16"},
    "optimum-int8": {"tool": "optimum-cli", "args": ["--weight-format", "int8"], "weights": "all int8_asym"},
}
PAIRS = (("ours-fp16", "optimum-fp16"), ("ours-int8", "optimum-int8"))


# ----------------------------------------------------------------------------- steps


def step_source(results: dict[str, Any], lay: Layout) -> None:
    """Generate the input once (the generator's peak RSS is a result of its own)."""
    if lay.source.is_dir():
        print(f"source: reusing {lay.source}")
        timing = lay.bench / "generate.time.txt"
        if "source" not in results and timing.is_file():
            wall, rss = parse_time_file(timing)
            results["source"] = stamped({"wall_s": wall, "max_rss_gib": rss, "bytes": folder_bytes(lay.source)})
        return
    if lay.input == "full":
        make = f"from convert.testing import generate\ngenerate('sdxl-base-shapes', Path({str(lay.source)!r}), 0)"
    else:  # the tiny pipeline with fp16 variant files, like the full-size input
        make = ("from convert.testing.sdxl import build_tiny_sdxl_pipeline, write_pipeline\n"
                f"write_pipeline(build_tiny_sdxl_pipeline(0), Path({str(lay.source)!r}), variant='fp16')")
    code = f"import logging; logging.basicConfig(level=logging.INFO)\nfrom pathlib import Path\n{make}"
    m = measure([PYTHON, "-c", code], lay.bench / "generate.log")
    if m.returncode:
        raise SystemExit(f"generating the source failed; see {m.log}")
    results["source"] = stamped({"wall_s": m.wall_s, "max_rss_gib": m.max_rss_gib, "bytes": folder_bytes(lay.source)})


def step_convert(run: str, results: dict[str, Any], lay: Layout) -> None:
    spec = CONVERTS[run]
    out = lay.bench / "out" / run
    log = lay.logs / f"convert-{run}.log"
    if spec["tool"] == "ours":
        found = convert_ours(spec["recipe"], out, log, lay)
    else:
        shutil.rmtree(out, ignore_errors=True)
        command = [str(BIN / "optimum-cli"), "export", "openvino", "--model", str(lay.source), "--task", "text-to-image",
                   "--variant", "fp16", *spec["args"], str(out)]
        print(f"convert: {run}: {' '.join(command)}", flush=True)
        found = {**asdict(measure(command, log, {"HF_HUB_OFFLINE": "1"})), **bundle_sizes(output_of(out, None))}
    results.setdefault("convert", {})[run] = stamped({**found, "weights": spec["weights"], "tool": spec["tool"]})
    m = results["convert"][run]
    print(f"convert: {run}: rc {m['returncode']}, {m['wall_s']:.0f} s, peak {m['max_rss_gib']:.2f} GiB "
          f"(tree PSS {m['tree_pss_gib']:.2f} GiB, anonymous {m['tree_anon_gib']:.2f} GiB)", flush=True)


def step_speed(kind: str, run: str, results: dict[str, Any], lay: Layout) -> None:
    """One speed measurement in its own process (`_speed` below), so its peak RSS is its own."""
    bundle = Path(results["convert"][run]["bundle"])
    out = lay.logs / f"speed-{kind}-{run}.json"
    command = [PYTHON, str(Path(__file__).resolve()), "_speed", kind, str(bundle), str(out)]
    print(f"speed: {kind} on {run}", flush=True)
    m = measure(command, lay.logs / f"speed-{kind}-{run}.log")
    values = json.loads(out.read_text()) if m.returncode == 0 and out.is_file() else {"error": f"rc {m.returncode}; see {m.log}"}
    results.setdefault("speed", {})[f"{kind}:{run}"] = stamped({**values, "max_rss_gib": m.max_rss_gib, "wall_s": m.wall_s})
    print(f"speed: {kind} on {run}: {values}", flush=True)


def step_parity(results: dict[str, Any], lay: Layout) -> None:
    """Our submodels against optimum-cli's, same inputs, in a separate process."""
    out = lay.logs / "parity.json"
    command = [PYTHON, str(Path(__file__).resolve()), "_parity", json.dumps({k: v["bundle"] for k, v in results["convert"].items()}), str(out)]
    m = measure(command, lay.logs / "parity.log")
    results["parity"] = json.loads(out.read_text()) if m.returncode == 0 else {"error": f"rc {m.returncode}; see {m.log}"}
    results["parity_run"] = stamped({"wall_s": m.wall_s, "max_rss_gib": m.max_rss_gib})


# ----------------------------------------------------------------------------- in-process workers


def _speed(kind: str, bundle: Path, out: Path) -> None:
    import numpy as np
    import openvino as ov

    core = ov.Core()
    rng = np.random.default_rng(0)
    if kind == "unet":
        model = core.read_model(bundle / "unet" / "openvino_model.xml")
        from convert.testing.parity import example_inputs

        inputs = example_inputs(model, latent_side=128)
        t = time.monotonic()
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        compile_s = time.monotonic() - t
        t = time.monotonic()
        compiled(inputs)
        result = {"compile_s": compile_s, "step_s": time.monotonic() - t, "latent": "1x4x128x128"}
    else:
        from validate.metrics import count_non_finite
        from validate.precision import compile_for, emulate, plan_execution

        precision = "f32" if kind == "vae-f32" else "f16"
        model = core.read_model(bundle / "vae_decoder" / "openvino_model.xml")
        latents = {"latent_sample": (rng.standard_normal((1, 4, 128, 128)) / SCALING_FACTOR).astype(np.float32)}
        mode = plan_execution(core, "CPU", precision)  # type: ignore[arg-type]
        t = time.monotonic()
        runner = compile_for(core, emulate(model, precision) if mode.emulated else model, mode, latents)  # type: ignore[arg-type]
        compile_s = time.monotonic() - t
        t = time.monotonic()
        output = next(iter(runner(latents).values()))
        counts = count_non_finite(output)
        result = {"compile_s": compile_s, "decode_s": time.monotonic() - t, "emulated": mode.emulated,
                  "reason": mode.reason, "non_finite": counts.invalid, "values": counts.total, "image": "1024x1024"}
    out.write_text(json.dumps(result))


def _parity(bundles: dict[str, str], out: Path) -> None:
    """Per submodel: ours vs optimum-cli at equal weight formats, on the same inputs (CPU f32).

    The fp16 UNet is left out: OpenVINO CPU expands fp16 weights to f32 at compile time
    (a 14.7 GiB compile peak for the full UNet, two of them past what this machine has); the int8 UNets
    are compared instead, and the tiny test compares every weight path bit for bit.
    """
    from convert.testing.parity import submodel_parity

    pairs = [("ours-fp16", "optimum-fp16", c, 16) for c in ("text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder")]
    pairs.append(("ours-int8", "optimum-int8", "unet", 16))
    found = []
    for ours, theirs, component, side in pairs:
        p = submodel_parity(component, Path(bundles[ours]) / component / "openvino_model.xml",
                            Path(bundles[theirs]) / component / "openvino_model.xml", latent_side=side)
        found.append({"pair": f"{ours} vs {theirs}", **asdict(p), "relative": p.relative, "latent_side": side})
        print(found[-1], flush=True)
    out.write_text(json.dumps(found))


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16") if f" {f}" in flags]
    versions = {}
    for name in ("torch", "openvino", "openvino-tokenizers", "optimum-intel", "optimum", "nncf", "diffusers", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "-"
    return {"cpu": f"{model}, {os.cpu_count()} cores ({' '.join(isa)})", "ram": f"{mem / 1024**2:.1f} GiB",
            "python": platform.python_version(), "versions": ", ".join(f"{k} {v}" for k, v in versions.items())}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    return f"{value:.{digits}f}{unit}" if isinstance(value, (int, float)) else "-"


def measured_note(rows: dict[str, dict[str, Any]], latest: str | None) -> list[str]:
    """A footnote naming when the rows of a table were measured, if not all on the latest run's day (UTC)."""
    days: dict[str, list[str]] = {}
    for label, row in rows.items():
        if isinstance(row, dict) and row.get("measured_at"):
            when = row["measured_at"][:10] + (f" ({row['transcribed']})" if row.get("transcribed") else "")
            days.setdefault(when, []).append(label)
    if not days or (len(days) == 1 and latest is not None and next(iter(days)) == latest[:10]):
        return []
    return ["", "Measured (UTC): " + "; ".join(f"{', '.join(labels)} on {when}" for when, labels in sorted(days.items())) + "."]


def render(results: dict[str, Any], lay: Layout = FULL) -> str:
    m = results.get("machine") or machine()
    latest = results.get("date")
    title = "# Benchmarks: full-size SDXL conversion and bundle speed"
    if lay.input == "tiny":
        title = "# SMOKE RUN on the tiny pipeline (not benchmark numbers): " + title.removeprefix("# Benchmarks: ")
    lines = [title, "",
             f"Generated by `just bench` (scripts/bench.py); last results stored {latest or '?'} UTC, earlier rows say when "
             "they were measured (BENCHMARKS.json keeps every result with its `measured_at`). One run per row; no retries.", "",
             f"- Machine: {m['cpu']}, {m['ram']} RAM, no GPU; shared with other engineers (times are upper bounds, ±2x between runs on these VMs).",
             f"- Python {m['python']}; {m['versions']}.",
             "- Input: `sdxl-base-shapes` (seed 0): the SDXL base architecture (UNet 2.567 B parameters) with seeded random "
             "weights, stored as fp16 variant safetensors like the Hub's, in artifacts/bench/sdxl-base-shapes-seed0."]
    src = results.get("source")
    if src:
        lines.append(f"- Building that input once: {src['wall_s']:.0f} s, peak RSS {src['max_rss_gib']:.2f} GiB "
                     f"({src['bytes'] / GIB:.2f} GiB on disk; the generator's author measured 9.0 GiB before its fix, projected 7.5 GiB after).")
    lines += ["", "## Convert: ours vs optimum-cli", "",
              "Each run is its own process under `/usr/bin/time -v`. *Peak RSS* is the largest process's maximum RSS; "
              "*tree PSS* adds up the proportional set size of every process of the run, sampled every 0.25 s "
              "(PSS splits pages shared with forked children; sampling may miss spikes shorter than 0.25 s, and the per-process "
              "reads of one sample are not atomic, so a sum can slightly exceed the true peak); "
              "*anonymous* is the part of it not backed by files, which the kernel cannot reclaim without swap "
              "(the rest is mostly the mmapped input weights). "
              "Our runs include resolve (hashing the 7 GiB input), validation and packaging; optimum-cli only exports. "
              "Validation is reduced for the bench and runs at f32 only (the recipes target CPU f32): the VAE decoder and "
              "encoder on one image at 256x256, then the pipeline gate of issue 11, an f32 run of the whole exported pipeline "
              "(2 prompts, 3 steps at 256x256) that records the text-encoder and UNet calls. Its UNet compiled at f32 holds "
              "its weights expanded to f32 (~10 GiB), which sets the peak of the whole build; rows measured before "
              "2026-12-04 predate that gate, so compare them with the export stage's peak in the table by stage below.", "",
              "Our export reads fp16 weights zero-copy from the mmapped safetensors and, after each submodel and each of the "
              "4 int8 compression passes, drops the clean pages it has read from its RSS (MADV_DONTNEED; they stay in the "
              "page cache, and would be reclaimable by the kernel anyway): this lowers peak RSS and PSS, not the anonymous peak.", "",
              "optimum-cli: `optimum-cli export openvino --model <input> --task text-to-image --variant fp16 --weight-format {fp16|int8}`. "
              "The CLI has no per-submodel weight format, so at int8 it compresses every submodel (int8_asym, per-channel), "
              "where our recipe has an int8_asym UNet and fp16 text encoders and VAE: the UNet (93% of the weights) is the same work, "
              "the output sizes are not comparable.", "",
              "| run | weights | exit | wall | peak RSS | tree PSS peak | anonymous peak | IR size | bundle size |",
              "|---|---|---|---|---|---|---|---|---|"]
    conv = results.get("convert", {})
    for run in CONVERTS:
        r = conv.get(run)
        if r is None:
            lines.append(f"| {run} | {CONVERTS[run]['weights']} | not run | | | | | | |")
            continue
        lines.append(f"| {run} | {r['weights']} | {r['returncode']} | {r['wall_s']:.0f} s | {r['max_rss_gib']:.2f} GiB | "
                     f"{r['tree_pss_gib']:.2f} GiB | {r['tree_anon_gib']:.2f} GiB | {r['ir_bytes'] / GIB:.2f} GiB | {r['bundle_bytes'] / GIB:.2f} GiB |")
    lines += measured_note({run: conv[run] for run in CONVERTS if run in conv}, latest)
    lines += ["", "| ours / optimum-cli | wall | peak RSS | tree PSS peak | anonymous peak | peak RSS by end of our export | target |",
              "|---|---|---|---|---|---|---|"]
    for ours, theirs in PAIRS:
        a, b = conv.get(ours), conv.get(theirs)
        if a and b:
            export_peak = a.get("stage_peak_rss_gib", {}).get("export")
            lines.append(f"| {ours} / {theirs} | {_ratio(a['wall_s'], b['wall_s'])} | {_ratio(a['max_rss_gib'], b['max_rss_gib'])} | "
                         f"{_ratio(a['tree_pss_gib'], b['tree_pss_gib'])} | {_ratio(a['tree_anon_gib'], b['tree_anon_gib'])} | "
                         f"{_ratio(export_peak, b['max_rss_gib'])} | RSS <= 0.5x, wall <= 1.0x |")
    staged = {run: conv[run] for run in CONVERTS if run in conv and conv[run].get("stage_s")}
    if staged:
        names = list(dict.fromkeys(k for r in staged.values() for k in r["stage_s"]))
        lines += ["", "Our converts by stage (seconds, from the build's `--json`; peak RSS is the build process's largest "
                  "RSS by the end of that stage, from `getrusage`):", "",
                  "| run | " + " | ".join(names) + " | peak RSS by end of export | by end of validate |",
                  "|---|" + "---|" * (len(names) + 2)]
        for run, r in staged.items():
            peaks = r.get("stage_peak_rss_gib", {})
            lines.append(f"| {run} | " + " | ".join(_fmt(r["stage_s"].get(k), ' s') for k in names) +
                         f" | {_fmt(peaks.get('export'), ' GiB', 2)} | {_fmt(peaks.get('validate'), ' GiB', 2)} |")
    lines += ["", "## Bundle speed (CPU, 2 threads)", "",
              "UNet: one step of the int8 bundles' UNet at a 1x4x128x128 latent (1024x1024 image), f32 inference, after compile. "
              "VAE: the fp16 bundles' VAE decoder at 1024x1024 (1x4x128x128 latent / 0.13025, seeded), compiled for the static shape; "
              "f16 is emulated (validate/precision.py `emulate` + `compile_for`, as `plan_execution` decides: this CPU has no f16 hardware). "
              "Peak RSS is the measuring process's.", "",
              "| bundle | measurement | compile | run | peak RSS | non-finite |", "|---|---|---|---|---|---|"]
    speed = results.get("speed", {})
    for key, label, field in (("unet", "UNet step int8 @128x128", "step_s"), ("vae-f32", "VAE decode f32 @1024", "decode_s"),
                              ("vae-f16", "VAE decode emulated f16 @1024", "decode_s")):
        for run in (("ours-int8", "optimum-int8") if key == "unet" else ("ours-fp16", "optimum-fp16")):
            s = speed.get(f"{key}:{run}")
            if s is None:
                continue
            nf = f"{s['non_finite']}/{s['values']}" if "non_finite" in s else "-"
            lines.append(f"| {run} | {label} | {_fmt(s.get('compile_s'), ' s')} | {_fmt(s.get(field), ' s')} | "
                         f"{_fmt(s.get('max_rss_gib'), ' GiB', 2)} | {nf} |" + (f" {s['error']}" if "error" in s else ""))
    lines += measured_note(speed, latest)
    lines += ["", "| ours / optimum-cli | ratio | target |", "|---|---|---|"]
    for key, field, runs in (("unet", "step_s", ("ours-int8", "optimum-int8")), ("vae-f32", "decode_s", ("ours-fp16", "optimum-fp16")),
                             ("vae-f16", "decode_s", ("ours-fp16", "optimum-fp16"))):
        a, b = speed.get(f"{key}:{runs[0]}", {}), speed.get(f"{key}:{runs[1]}", {})
        lines.append(f"| {key} | {_ratio(a.get(field), b.get(field))} | <= 1.0x |")
    f32, f16 = speed.get("vae-f32:ours-fp16", {}), speed.get("vae-f16:ours-fp16", {})
    lines += ["", "## Issue 3: full-size overflow VAE decode at 1024x1024", "",
              "The input's VAE is the overflow-prone SDXL-shaped VAE (convert/testing/sdxl.py); measured on our fp16 bundle's vae_decoder.", "",
              "| f32 | emulated f16 | ratio (target <= 1.5x) | peak RSS f32 / f16 | f16 non-finite |", "|---|---|---|---|---|",
              f"| {_fmt(f32.get('decode_s'), ' s')} | {_fmt(f16.get('decode_s'), ' s')} | {_ratio(f16.get('decode_s'), f32.get('decode_s'))} | "
              f"{_fmt(f32.get('max_rss_gib'), ' GiB', 2)} / {_fmt(f16.get('max_rss_gib'), ' GiB', 2)} | "
              f"{f16.get('non_finite', '-')}/{f16.get('values', '-')} |"]
    lines += ["", "## Parity: our submodels vs optimum-cli's, same inputs", "",
              "OpenVINO CPU at f32, seeded inputs (77 tokens; latents 16x16, images 128x128). "
              "relative = max |ours - optimum| / max |optimum| over all outputs. The fp16 UNet is not compared at full size "
              "(CPU expands its weights to f32: a 14.7 GiB compile peak for each of the two); tests/test_export_parity.py compares every weight path on the tiny pipeline.", "",
              "| pair | submodel | max abs diff | max abs output | relative | same interface |", "|---|---|---|---|---|---|"]
    parity = results.get("parity")
    if isinstance(parity, list):
        for p in parity:
            lines.append(f"| {p['pair']} | {p['component']} | {p['max_abs']:.3g} | {p['ref_max_abs']:.3g} | {p['relative']:.2e} | {p['same_interface']} |")
        if any(p["component"] == "unet" and not p["same_interface"] for p in parity):
            lines += ["", "The int8 UNets differ in one input shape: optimum-cli's has `timestep` [1], ours [?]. optimum-cli's int8 "
                      "route re-loads the exported pipeline, whose loader reshapes `timestep` to [1], then quantizes and saves that; "
                      "our UNet keeps [?] like optimum-cli's own fp16 export and optimum's `export_from_model`. Op counts, constant "
                      "types and the weights file size are otherwise identical."]
    elif parity:
        lines.append(f"| parity failed: {parity.get('error')} | | | | | |")
    if parity:
        lines += measured_note({"parity": results.get("parity_run", {})}, latest)
    lines += bench_extra.render_gate(results.get("gate", {}), latest, measured_note)
    lines += bench_extra.render_single_file(results.get("single_file", {}), results.get("convert", {}), latest, measured_note)
    lines += bench_extra.render_rebuild(results.get("rebuild", {}), latest, measured_note)
    lines += bench_extra.render_runner(results.get("runner", {}), latest, measured_note)
    for note in results.get("notes", {}).values():
        lines += ["", f"## {note['title']}", "", *note["markdown"].splitlines()]
        lines += measured_note({"this section": note}, latest)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI

STEPS = ("source", "convert", "speed", "parity", "gate", "single-file", "rebuild", "runner")
STEPS_HELP = (
    "comma-separated subset of the steps, in this order; full-size cost on the 2-core VM: "
    "source (generate the 6.5 GiB input once: ~2 min, 7 GiB), "
    "convert (per run: ours ~3-4 min / 12-19 GiB with the f32 pipeline gate, optimum-cli ~4-5 min / 23 GiB), "
    "speed (6 processes, ~4 min, up to 8 GiB), parity (~2 min), "
    "gate (f32 capture + 10 processes, measured 9 min, up to 14 GiB; needs ours-fp16 and ours-int8), "
    "single-file (generate the single file: ~1-2.6 min / 7.4 GiB; convert it: measured 3.3 min / 19 GiB; "
    "needs ours-fp16; both 6.5 GiB files are deleted after), "
    "rebuild (local Hub: upload 6.5 GiB, measured: first rebuild 4.5 min / 12 GiB, no-op 0.5 s, VAE-only rebuild 2.5 min; "
    "up to ~36 GiB of disk, freed at the end), "
    "runner (scripts/runner_sim.py, root: upload 6.9 GB to a local Hub, then the flagship-shaped rebuild with its own gate "
    "at 1024 inside a 14 GiB cgroup on a 14 GB disk, then a no-op rebuild; ~1 h on the 2-core VM)"
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_speed":
        _speed(argv[1], Path(argv[2]), Path(argv[3]))
        return 0
    if argv and argv[0] == "_parity":
        _parity(json.loads(argv[1]), Path(argv[2]))
        return 0
    if argv and argv[0] in bench_extra.WORKERS:
        bench_extra.WORKERS[argv[0]](*argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default=",".join(STEPS[:4]), help=STEPS_HELP + f" (default: {','.join(STEPS[:4])})")
    parser.add_argument("--runs", default=",".join(CONVERTS), help="convert runs to (re)do: " + ", ".join(CONVERTS))
    parser.add_argument("--input", choices=sorted(LAYOUTS), default="full",
                        help="full: the benchmark (writes BENCHMARKS.json/.md); tiny: smoke run of every step on the "
                             "tiny pipeline into artifacts/bench-tiny/ (never touches BENCHMARKS.*)")
    parser.add_argument("--render-only", action="store_true", help="re-render the report from the stored results; run nothing")
    parser.add_argument("--fresh", action="store_true",
                        help="forget stored results of this --input (full: also the transcribed rows, e.g. optimum-cli's)")
    args = parser.parse_args(argv)
    lay = LAYOUTS[args.input]
    steps, runs = args.steps.split(","), args.runs.split(",")
    unknown = sorted(set(steps) - set(STEPS)) + sorted(set(runs) - set(CONVERTS))
    if unknown:
        parser.error(f"unknown step or run: {', '.join(unknown)}")
    results: dict[str, Any] = {} if args.fresh or not lay.results.is_file() else json.loads(lay.results.read_text())
    if args.render_only:
        lay.report.write_text(render(results, lay))
        print(f"rendered {lay.report} from {lay.results}")
        return 0

    def save() -> None:
        results["machine"], results["date"] = machine(), time.strftime("%Y-%m-%dT%H:%M", time.gmtime())
        lay.results.parent.mkdir(parents=True, exist_ok=True)
        lay.results.write_text(json.dumps(results, indent=1) + "\n")
        lay.report.write_text(render(results, lay))

    lay.bench.mkdir(parents=True, exist_ok=True)
    if "source" in steps:
        step_source(results, lay)
        save()
    if "convert" in steps:
        for run in runs:
            step_convert(run, results, lay)
            save()
    if "speed" in steps:
        for kind, run in (("unet", "ours-int8"), ("unet", "optimum-int8"), ("vae-f32", "ours-fp16"),
                          ("vae-f32", "optimum-fp16"), ("vae-f16", "ours-fp16"), ("vae-f16", "optimum-fp16")):
            if run in runs and run in results.get("convert", {}):
                step_speed(kind, run, results, lay)
                save()
    if "parity" in steps and all(r in results.get("convert", {}) for r in CONVERTS):
        step_parity(results, lay)
        save()
    if "gate" in steps:
        bench_extra.step_gate(results, lay, save)
    if "single-file" in steps:
        bench_extra.step_single_file(results, lay, save)
    if "rebuild" in steps:
        bench_extra.step_rebuild(results, lay, save)
    if "runner" in steps:
        bench_extra.step_runner(results, lay, save)
    print(lay.report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
