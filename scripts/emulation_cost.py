"""What the f16 emulation costs per submodel on this CPU: f32 run vs emulated f16 run, as the gate compiles them.

Prints a table (compile and median run time of each, the ratio, and how the emulated graph had to
be compiled here: fused, unfused NaN guards or snippets disabled; see validate/host.py). The gate's
cost target is an emulated run within 1.25x of the f32 run per submodel.

    python scripts/emulation_cost.py BUNDLE [--isa AVX2] [--runs 7] [--form fused|bounded|no-snippets]

--isa AVX2 re-runs this script with ONEDNN_MAX_CPU_ISA=AVX2, which limits OpenVINO's JIT to AVX2
code on an AVX-512 host. That limit is faithful for the f32-hint compiles measured here, but not
for int8 weight-compressed FullyConnected layers (OpenVINO picks them from CPUID, oneDNN then
refuses them): such a part shows "n/a" there; time it on a real AVX2 CPU.
--form forces one form for every part (to measure what each would cost), instead of the gate's
fallback order.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
TINY_WIDTH = {"text_embeds": 64, "encoder_hidden_states": 96}  # the tiny SDXL's, where an IR leaves them dynamic


def _inputs(part: str, model: Any, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """Static inputs at the tiny gate's sizes (CFG batch 2, 128x128 image), by input name."""
    sizes = {"input_ids": (2, 77), "sample": (2, 4, 16, 16), "timestep": (1,), "text_embeds": (2, -1),
             "time_ids": (2, 6), "latent_sample": (1, 4, 64, 64), "encoder_hidden_states": (2, 77, -1)}
    if part == "vae_encoder":
        sizes["sample"] = (1, 3, 256, 256)
    feed = {}
    for port in model.inputs:
        name, shape = port.get_any_name(), port.get_partial_shape()
        if name not in sizes:
            return None
        dims = [d if d != -1 else (shape[i].get_length() if shape[i].is_static else TINY_WIDTH[name])
                for i, d in enumerate(sizes[name])]
        if name == "input_ids":
            feed[name] = rng.integers(0, 400, dims).astype(np.int64)
        elif name == "timestep":
            feed[name] = np.array([500], np.int64)
        elif name == "time_ids":
            feed[name] = np.array([[128, 128, 0, 0, 128, 128]] * dims[0], np.float32)
        else:
            feed[name] = rng.standard_normal(dims).astype(np.float32)
    return feed


def _time(compiled: Any, feed: dict[str, np.ndarray], runs: int) -> float:
    request = compiled.create_infer_request()
    request.infer(feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer(feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compile(core: Any, graph: Any, form: str | None) -> tuple[Any, str]:
    from validate.host import bounded_form, compile_on_host

    if form is None:
        host = compile_on_host(core, graph, "CPU", F32)
        return host.compiled, host.fallback or "fused"
    if form == "bounded":
        graph = bounded_form(graph) or graph
    config = {**F32, "SNIPPETS_MODE": "DISABLE"} if form == "no-snippets" else F32
    return core.compile_model(graph, "CPU", config), form


def measure(bundle: Path, runs: int, form: str | None) -> list[dict[str, Any]]:
    import openvino as ov

    from validate.host import cpu_isa
    from validate.precision import emulate, with_static_shapes

    core, rng, rows = ov.Core(), np.random.default_rng(0), []
    print(f"CPU: {cpu_isa().describe()}\n")
    print("| part | f32 run | emulated f16 run | ratio | f32 compile | f16 compile | compiled as |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for xml in sorted(bundle.glob("*/openvino_model.xml")):
        part = xml.parent.name
        model = core.read_model(xml)
        feed = _inputs(part, model, rng)
        if feed is None:
            continue
        row: dict[str, Any] = {"part": part}
        try:
            start = time.perf_counter()
            compiled = core.compile_model(with_static_shapes(model, feed), "CPU", F32)
            row["f32_compile"], row["f32_run"] = time.perf_counter() - start, _time(compiled, feed, runs)
            del compiled
            emulated = emulate(model, "f16")
            start = time.perf_counter()
            compiled, row["form"] = _compile(core, with_static_shapes(emulated.model, feed), form)
            row["f16_compile"] = time.perf_counter() - start
            row["f16_run"] = _time(compiled, {**feed, **emulated.extra_inputs}, runs)
        except RuntimeError as e:
            row["error"] = str(e).strip().splitlines()[-1][:80]
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"| {row['part']} | n/a: {row['error']} | | | | | |"
    ratio = row["f16_run"] / row["f32_run"]
    return (f"| {row['part']} | {row['f32_run'] * 1e3:.1f} ms | {row['f16_run'] * 1e3:.1f} ms | {ratio:.2f}x | "
            f"{row['f32_compile']:.2f} s | {row['f16_compile']:.2f} s | {row['form']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a built bundle (folder with <part>/openvino_model.xml)")
    parser.add_argument("--isa", help="run with ONEDNN_MAX_CPU_ISA set to this (e.g. AVX2)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per model (median reported)")
    parser.add_argument("--form", choices=("fused", "bounded", "no-snippets"), default=None,
                        help="force one form of the emulated graph (default: the gate's fallback order)")
    args = parser.parse_args(argv)
    if args.isa and os.environ.get("ONEDNN_MAX_CPU_ISA") != args.isa:
        command = [sys.executable, __file__, str(args.bundle), "--runs", str(args.runs)]
        command += ["--form", args.form] if args.form else []
        return subprocess.call(command, env={**os.environ, "ONEDNN_MAX_CPU_ISA": args.isa})
    rows = measure(args.bundle, args.runs, args.form)
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
