"""The full-size measurements open issues still lack: the gate's cost (issue 11), a single-file
convert (issue 10) and rebuilds against the local Hub (issue 12).

Each measured piece is its own process under `measure` (so its peak RSS is its own); the
workers at the bottom run the product's own functions (validate/pipeline_run.py to capture
inputs, validate/precision.py `plan_execution`/`emulate`/`compile_for` to run them, the
component cache and `rebuild` through the CLI), never a copy of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench_core import BIN, GIB, PYTHON, ROOT, Layout, convert_ours, folder_bytes, measure, recipe_arg, stamped

SCRIPT = Path(__file__).resolve().parent / "bench.py"
Save = Callable[[], None]
Note = Callable[[dict[str, dict[str, Any]], str | None], list[str]]

#: submodel -> the convert run whose bundle holds the IR measured (the fp16 UNet compiled at f32 on CPU peaks at 14.7 GiB and holds ~10 GiB, measured 2026-12-05)
GATE_PARTS: dict[str, str] = {"text_encoder": "ours-fp16", "text_encoder_2": "ours-fp16", "unet": "ours-int8",
                              "vae_decoder": "ours-fp16", "vae_encoder": "ours-fp16"}
GATE_TARGET = 1.25  # issue 11 item 5: emulated f16 at most 1.25x the f32 run


def _side(lay: Layout) -> int:
    return 1024 if lay.input == "full" else 64


def _ready(results: dict[str, Any], runs: tuple[str, ...], step: str) -> bool:
    conv = results.get("convert", {})
    missing = [r for r in runs if r not in conv or not Path(conv[r]["bundle"]).is_dir()]
    if missing:
        print(f"{step}: skipped: no bundle of {', '.join(missing)} (run --steps convert --runs {','.join(missing)} first)")
    return not missing


def _worker(results_file: Path, m: Any) -> dict[str, Any]:
    ok = m.returncode == 0 and results_file.is_file()
    values: dict[str, Any] = json.loads(results_file.read_text()) if ok else {"error": f"rc {m.returncode}; see {m.log}"}
    return {**values, "wall_s": m.wall_s, "max_rss_gib": m.max_rss_gib, "returncode": m.returncode}


# ----------------------------------------------------------------------------- gate (issue 11)


def step_gate(results: dict[str, Any], lay: Layout, save: Save) -> None:
    """Capture the gate's inputs once at f32 (int8 bundle's pipeline), then each submodel x precision alone."""
    if not _ready(results, ("ours-fp16", "ours-int8"), "gate"):
        return
    conv, gate = results["convert"], results.setdefault("gate", {})
    calls = lay.bench / "gate-calls"
    shutil.rmtree(calls, ignore_errors=True)
    print(f"gate: capturing inputs at {_side(lay)}x{_side(lay)} from an f32 run of {conv['ours-int8']['bundle']}", flush=True)
    m = measure([PYTHON, str(SCRIPT), "_gate_capture", conv["ours-int8"]["bundle"], str(_side(lay)), str(calls)],
                lay.logs / "gate-capture.log")
    gate["capture"] = stamped(_worker(calls / "summary.json", m))
    save()
    if m.returncode:
        print(f"gate: capture failed; see {m.log}")
        return
    for part, run in GATE_PARTS.items():
        for precision in ("f32", "f16"):
            out = lay.logs / f"gate-{part}-{precision}.json"
            out.unlink(missing_ok=True)
            m = measure([PYTHON, str(SCRIPT), "_gate", part, precision, conv[run]["bundle"], str(calls), str(out)],
                        lay.logs / f"gate-{part}-{precision}.log")
            gate[f"{part}:{precision}"] = stamped({**_worker(out, m), "bundle": run})
            print(f"gate: {part} {precision}: {gate[f'{part}:{precision}']}", flush=True)
            save()
    shutil.rmtree(calls, ignore_errors=True)


def _save_calls(calls: dict[str, list[Any]], folder: Path) -> None:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for part, recorded in calls.items():
        arrays = {}
        for i, call in enumerate(recorded):
            arrays |= {f"in|{i}|{k}": v for k, v in call.inputs.items()} | {f"out|{i}|{k}": v for k, v in call.outputs.items()}
        np.savez(folder / f"{part}.npz", **arrays)


def _load_calls(path: Path) -> list[Any]:
    import numpy as np

    from validate.pipeline_run import Call

    found: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    with np.load(path) as data:
        for key in data.files:
            kind, index, name = key.split("|", 2)
            found.setdefault(int(index), ({}, {}))[0 if kind == "in" else 1][name] = data[key]
    return [Call(*found[i]) for i in sorted(found)]


def _gate_capture(bundle: str, side: str, out: str) -> None:
    """The gate's inputs: the bundle's pipeline at f32 (its tokenizers, scheduler, CFG batch of 2), recorded.

    One denoising step of the first prompt (one UNet call, one decode), the other prompts through
    the text encoders only, and the vae_encoder on the gate's first sample photograph.
    """
    import openvino as ov

    from convert.recipe import EndToEndSettings
    from validate.inputs import sample_images
    from validate.pipeline_run import PARTS, PartRequest, generate, install, load_pipeline
    from validate.precision import plan_execution

    folder, size, core, e2e = Path(bundle), int(side), ov.Core(), EndToEndSettings()
    mode = plan_execution(core, "CPU", "f32")
    started = time.monotonic()
    pipeline = load_pipeline(folder)
    requests = {p: PartRequest(core, core.read_model(folder / p / "openvino_model.xml"), mode, record=True) for p in PARTS}
    install(pipeline, requests)
    generate(pipeline, e2e.prompts[0], steps=1, size=size, guidance_scale=e2e.guidance_scale, seed=e2e.seed)
    for prompt in e2e.prompts[1:]:
        pipeline.encode_prompt(prompt, num_images_per_prompt=1, do_classifier_free_guidance=True)
    encoder = PartRequest(core, core.read_model(folder / "vae_encoder" / "openvino_model.xml"), mode, record=True)
    encoder({"sample": sample_images(["astronaut"], size)})
    calls = {p: r.calls for p, r in requests.items()} | {"vae_encoder": encoder.calls}
    _save_calls(calls, Path(out))
    summary = {"seconds": time.monotonic() - started, "prompts": len(e2e.prompts), "side": size,
               "calls": {p: [{k: list(v.shape) for k, v in c.inputs.items()} for c in cs] for p, cs in calls.items()}}
    (Path(out) / "summary.json").write_text(json.dumps(summary))


def _gate(part: str, precision: str, bundle: str, calls_dir: str, out: str) -> None:
    """One submodel at one precision on the captured calls, as the gate runs it (emulated where planned)."""
    import openvino as ov

    from validate.metrics import count_non_finite
    from validate.precision import compile_for, emulate, plan_execution
    from validate.submodels import cosine

    core = ov.Core()
    model = core.read_model(Path(bundle) / part / "openvino_model.xml")
    calls = _load_calls(Path(calls_dir) / f"{part}.npz")
    mode = plan_execution(core, "CPU", precision)  # type: ignore[arg-type]
    started = time.monotonic()
    runner = compile_for(core, emulate(model, mode.precision) if mode.emulated else model, mode, calls[0].inputs)
    compile_s = time.monotonic() - started
    started = time.monotonic()
    outputs = [runner(call.inputs) for call in calls]
    run_s = time.monotonic() - started
    nan = posinf = neginf = total = 0
    worst = 1.0
    for call, got in zip(calls, outputs, strict=True):
        for name, reference in call.outputs.items():
            counts = count_non_finite(got[name])
            nan, posinf, neginf, total = nan + counts.nan, posinf + counts.posinf, neginf + counts.neginf, total + counts.total
            c = cosine(got[name], reference)
            worst = c if math.isnan(c) or c < worst else worst
    shapes = "; ".join(", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in c.inputs.items()) for c in calls[:1])
    Path(out).write_text(json.dumps({
        "compile_s": compile_s, "run_s": run_s, "calls": len(calls), "inputs": shapes, "emulated": mode.emulated,
        "reason": mode.reason, "nan": nan, "posinf": posinf, "neginf": neginf, "non_finite": nan + posinf + neginf,
        "values": total, "min_cosine": None if math.isnan(worst) else round(worst, 8)}))


def _secs(value: float) -> str:
    return f"{value:.1f} s" if value >= 10 else f"{value:.2f} s" if value >= 0.1 else f"{value * 1000:.0f} ms"


def render_gate(gate: dict[str, Any], latest: str | None, note: Note) -> list[str]:
    if not gate:
        return []
    capture = gate.get("capture", {})
    side = int(capture.get("side", 1024))
    lines = ["", "## Issue 11: the gate's cost per submodel (f32 vs emulated f16)", "",
             "Inputs captured once by the gate's own machinery (validate/pipeline_run.py: the int8 bundle's pipeline at f32, "
             "its tokenizers and scheduler, one denoising step of the first default prompt: one UNet call with the "
             "classifier-free-guidance batch of 2 at a "
             f"{side // 8}x{side // 8} latent, one {side}x{side} decode; the other prompt through the "
             f"text encoders; the vae_encoder on scikit-image's astronaut at {side}x{side})"
             + (f": {capture.get('wall_s', 0):.0f} s, peak RSS {capture.get('max_rss_gib', 0):.2f} GiB" if "error" not in capture
                else f": FAILED ({capture['error']})") + ". "
             "Then each submodel at each precision in its own process: `plan_execution` + `emulate` + `compile_for` "
             "(static shapes) as the gate runs it; *compile* includes the emulation rewrite. Text encoders and VAE from the "
             "fp16 bundle, the UNet from the int8 bundle (the fp16 UNet compiled at f32 on CPU peaks at 14.7 GiB and holds ~10 GiB, measured 2026-12-05). "
             "min cosine: worst output vs the captured f32 output.", "",
             "| submodel | f32 compile / run | emulated f16 compile / run | ratio (run) | target <= 1.25x | peak RSS f32 / f16 | f16 non-finite | f16 min cosine |",
             "|---|---|---|---|---|---|---|---|"]
    for part in GATE_PARTS:
        a, b = gate.get(f"{part}:f32"), gate.get(f"{part}:f16")
        if a is None and b is None:
            continue
        a, b = a or {}, b or {}

        def pair(r: dict[str, Any]) -> str:
            return f"{_secs(r['compile_s'])} / {_secs(r['run_s'])}" if "run_s" in r else (r.get("error") or "-")

        ratio = b["run_s"] / a["run_s"] if "run_s" in a and "run_s" in b and a["run_s"] else None
        verdict = "-" if ratio is None else ("yes" if ratio <= GATE_TARGET else "NO")
        nf = f"{b['non_finite']}/{b['values']}" if "values" in b else "-"
        lines.append(f"| {part} ({GATE_PARTS[part].removeprefix('ours-')}) | {pair(a)} | {pair(b)} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | {verdict} | "
                     f"{a.get('max_rss_gib', 0):.2f} / {b.get('max_rss_gib', 0):.2f} GiB | {nf} | {'n/a' if b.get('min_cosine', '-') is None else b.get('min_cosine', '-')} |")
    return lines + note({k: v for k, v in gate.items()}, latest)


# ----------------------------------------------------------------------------- single file (issue 10)

SINGLE_FILE_RECIPE = "bench-sdxl-shapes-singlefile"
SINGLE_FILE_DIR = "sdxl-base-shapes-single-file-seed0"  # the recipe's path, under artifacts/bench(-tiny)/


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def step_single_file(results: dict[str, Any], lay: Layout, save: Save) -> None:
    """Generate the same seeded weights as one original-layout file, convert it, compare with ours-fp16."""
    if not _ready(results, ("ours-fp16",), "single-file"):
        return
    entry = results.setdefault("single_file", {})
    folder = lay.bench / SINGLE_FILE_DIR
    if lay.input == "full":
        make = f"generate('sdxl-base-shapes-single-file', Path({str(folder)!r}), 0)"
        edits = None
    else:  # the tiny pipeline's single file (f32) and its config folder, where the recipe expects them
        make = (f"generate('tiny-sdxl-single-file', Path({str(folder)!r}), 0)\n"
                f"generate('tiny-sdxl-single-file-config', Path({str(folder / 'config')!r}), 0)")
        edits = {"file: sdxl-base-shapes.safetensors": "file: tiny-sdxl.safetensors"}
    if not folder.is_dir():
        code = f"import logging; logging.basicConfig(level=logging.INFO)\nfrom pathlib import Path\nfrom convert.testing import generate\n{make}"
        m = measure([PYTHON, "-c", code], lay.logs / "single-file-generate.log")
        entry["generate"] = stamped({"wall_s": m.wall_s, "max_rss_gib": m.max_rss_gib, "returncode": m.returncode,
                                     "bytes": folder_bytes(folder) if folder.is_dir() else 0})
        save()
        if m.returncode:
            print(f"single-file: generating failed; see {m.log}")
            return
    convert = convert_ours(SINGLE_FILE_RECIPE, lay.bench / "out" / "single-file", lay.logs / "convert-single-file.log",
                           lay, edits)
    entry["convert"] = stamped(convert)
    save()
    print(f"single-file: convert rc {convert['returncode']}, {convert['wall_s']:.0f} s, peak {convert['max_rss_gib']:.2f} GiB", flush=True)
    if convert["returncode"] == 0:
        entry["compare"] = stamped(_compare(Path(convert["bundle"]), Path(results["convert"]["ours-fp16"]["bundle"]), lay))
        save()
    # disk: the lead runs rebuild next (up to ~36 GiB); the numbers are kept, the 13 GiB of files are not
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(lay.bench / "out" / "single-file", ignore_errors=True)


def _compare(single: Path, diffusers: Path, lay: Layout) -> dict[str, Any]:
    """Per submodel: are the IR weights byte-identical? If not, the output difference (parity machinery)."""
    found: dict[str, Any] = {}
    for part in GATE_PARTS:
        a, b = single / part / "openvino_model.bin", diffusers / part / "openvino_model.bin"
        same = a.is_file() and b.is_file() and _sha256(a) == _sha256(b)
        found[part] = {"bin_identical": same, "xml_identical": (single / part / "openvino_model.xml").read_bytes()
                       == (diffusers / part / "openvino_model.xml").read_bytes()}
        if same:
            continue
        if part == "unet" and lay.input == "full":
            found[part]["parity"] = "not compared: the fp16 UNet compiled at f32 on CPU peaks at 14.7 GiB and holds ~10 GiB, measured 2026-12-05"
            continue
        out = lay.logs / f"single-file-parity-{part}.json"
        m = measure([PYTHON, str(SCRIPT), "_sf_parity", part, str(a.with_suffix(".xml")), str(b.with_suffix(".xml")), str(out)],
                    lay.logs / f"single-file-parity-{part}.log")
        found[part]["parity"] = _worker(out, m)
    return found


def _sf_parity(part: str, ours: str, reference: str, out: str) -> None:
    from convert.testing.parity import submodel_parity

    p = submodel_parity(part, Path(ours), Path(reference), latent_side=16)
    Path(out).write_text(json.dumps({"max_abs": p.max_abs, "ref_max_abs": p.ref_max_abs, "relative": p.relative,
                                     "same_interface": p.same_interface}))


def render_single_file(entry: dict[str, Any], conv: dict[str, Any], latest: str | None, note: Note) -> list[str]:
    if not entry:
        return []
    gen, sf, ref = entry.get("generate"), entry.get("convert"), conv.get("ours-fp16")
    lines = ["", "## Issue 10: a full-size single-file convert vs the diffusers-layout convert of the same weights", "",
             "The single file is `sdxl-base-shapes-single-file` (convert/testing/single_file.py): the same seeded fp16 "
             "weights as the input above, in the original (Stability) key layout, one .safetensors written tensor by tensor, "
             "with a config folder beside it (configs and tokenizers, no weights). Recipe "
             f"`recipes/{SINGLE_FILE_RECIPE}.yaml` (all fp16, the bench's reduced gate) against `ours-fp16` above."]
    if gen:
        lines += ["", f"Generating it: {gen['wall_s']:.0f} s, peak RSS {gen['max_rss_gib']:.2f} GiB, "
                     f"{gen.get('bytes', 0) / GIB:.2f} GiB on disk" + (" (FAILED)" if gen.get("returncode") else "") + "."]
    lines += ["", "| convert | exit | wall | peak RSS | tree PSS peak | anonymous peak | bundle size | "
              "read + export (s) | peak RSS by end of export |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in (("single file", sf), ("diffusers layout (ours-fp16)", ref)):
        if r:
            staged, peaks = r.get("stage_s", {}), r.get("stage_peak_rss_gib", {})
            reading = f"{sum(staged.get(k, 0.0) for k in ('materialize', 'patch', 'export')):.1f}" if staged else "-"
            export_peak = f"{peaks['export']:.2f} GiB" if "export" in peaks else "-"
            lines.append(f"| {label} | {r['returncode']} | {r['wall_s']:.0f} s | {r['max_rss_gib']:.2f} GiB | "
                         f"{r['tree_pss_gib']:.2f} GiB | {r['tree_anon_gib']:.2f} GiB | {r['bundle_bytes'] / GIB:.2f} GiB | "
                         f"{reading} | {export_peak} |")
    lines += ["", "*read + export* is the materialize (single file only: diffusers' `from_single_file`, written as a "
              "diffusers folder), patch and export stages; the rest of each run is resolve, the same validation and packaging."]
    compare = entry.get("compare")
    if compare:
        lines += ["", "| submodel | IR weights (.bin) byte-identical | .xml identical | if not: max relative output diff |",
                  "|---|---|---|---|"]
        for part, c in compare.items():
            if part == "measured_at":
                continue
            parity = c.get("parity")
            diff = "" if parity is None else (parity if isinstance(parity, str) else
                                              f"{parity['relative']:.2e}" if "relative" in parity else parity.get("error", "?"))
            lines.append(f"| {part} | {'yes' if c['bin_identical'] else 'no'} | {'yes' if c['xml_identical'] else 'no'} | {diff} |")
    return lines + note({k: v for k, v in entry.items() if isinstance(v, dict)}, latest)


# ----------------------------------------------------------------------------- rebuild (issue 12)

TOKEN = "hf_bench_token"  # the test server accepts any token as its one user


def _rebuild_recipe(lay: Layout, base_repo: str, vae_repo: str, publish_repo: str, folder: Path) -> Path:
    """bench-sdxl-shapes (int8 UNet, the bench's reduced gate) with Hub sources, a VAE substitution and publish:.

    Written outside recipes/: a recipe with publish: there would join `rebuild --all` and the CI matrix.
    """
    import yaml

    recipe = yaml.safe_load(Path(recipe_arg("bench-sdxl-shapes", lay) if lay.input == "tiny"
                                     else ROOT / "recipes" / "bench-sdxl-shapes.yaml").read_text())
    recipe["name"] = "bench-sdxl-shapes-rebuild"
    recipe["base"] = {"hub": {"repo": base_repo, "revision": "main", "variant": "fp16"}, "license": "apache-2.0"}
    recipe["substitutions"] = {"vae": {"source": {"hub": {"repo": vae_repo, "revision": "main"}, "license": "apache-2.0"},
                                       "reason": "benchmark: a VAE from its own repo, so a VAE-only upstream change can be measured"}}
    recipe["publish"] = {"repo": publish_repo, "private": True}
    path = folder / "recipes" / "bench-sdxl-shapes-rebuild.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _generate_vae(lay: Layout, out: Path, seed: int) -> Path:
    name = "sdxl-vae-shapes-fp16-fix" if lay.input == "full" else "tiny-sdxl-vae-fp16-fix"
    code = f"from pathlib import Path\nfrom convert.testing import generate\ngenerate({name!r}, Path({str(out)!r}), {seed})"
    subprocess.run([PYTHON, "-c", code], check=True, cwd=ROOT)
    return out


def _retouched_vae(path: Path, out: Path) -> Path:
    """The same VAE with one decoder bias nudged by 1e-4 (as tests/test_rebuild.py does): new bytes, same images.

    A re-seeded VAE would be a different VAE, which the gate's check against the base's own VAE rightly refuses.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if k.startswith("decoder.") and k.endswith(".bias"))
    tensors[name] = tensors[name] + tensors[name].dtype.type(1e-4)
    save_file(tensors, out, metadata=metadata)
    return out


def step_rebuild(results: dict[str, Any], lay: Layout, save: Save) -> None:
    """First rebuild, a no-op rebuild and a VAE-only rebuild against tests/hub_server.py, each under `measure`."""
    if not lay.source.is_dir():
        print(f"rebuild: skipped: no source {lay.source} (run --steps source first)")
        return
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ |= {"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}  # before the import
    from hub_server import HubServer
    from huggingface_hub import HfApi

    folder = lay.bench / "rebuild"
    shutil.rmtree(folder, ignore_errors=True)
    entry = results.setdefault("rebuild", {})
    hub = HubServer(folder / "hub")
    hub.start()
    try:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        base_repo, vae_repo, publish_repo = "test-user/bench-sdxl-upstream", "test-user/bench-vae-upstream", "test-user/bench-sdxl-ov"
        started = time.monotonic()
        for repo, source in ((base_repo, lay.source), (vae_repo, _generate_vae(lay, folder / "vae-seed0", 0))):
            api.create_repo(repo)
            api.upload_folder(folder_path=source, repo_id=repo, commit_message="upstream")
        entry["upstream"] = stamped({"upload_s": time.monotonic() - started, "bytes": folder_bytes(lay.source)})
        recipe = _rebuild_recipe(lay, base_repo, vae_repo, publish_repo, folder)
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(folder / "hf-home"),
               "HF_HUB_CACHE": str(folder / "hf-home" / "hub"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "0"}

        def rebuild(label: str) -> None:
            start = len(hub.requests_log())
            doc = lay.logs / f"rebuild-{label}.json"
            command = [str(BIN / "sdxl-convert"), "rebuild", str(recipe), "--json", "--artifacts", str(folder / "artifacts"),
                       "--cache", str(folder / "cache")]
            print(f"rebuild: {label}: {' '.join(command)}", flush=True)
            m = measure(command, lay.logs / f"rebuild-{label}.log", env, stdout=doc)
            requests = hub.requests_log()[start:]
            try:
                outcome = json.loads(doc.read_text())["recipes"][0]
            except (OSError, ValueError, KeyError, IndexError):
                outcome = {"status": "failed", "message": f"no --json document; see {m.log}"}
            entry[label] = stamped({
                "returncode": m.returncode, "wall_s": m.wall_s, "max_rss_gib": m.max_rss_gib, "tree_pss_gib": m.tree_pss_gib,
                "status": outcome.get("status"), "seconds": outcome.get("seconds"), "changed": outcome.get("changed", []),
                "exported": outcome.get("exported_components", []), "reused": outcome.get("reused_components", []),
                "message": outcome.get("message", ""), "requests": len(requests),
                "downloads": sum(1 for r in requests if r[0] == "GET" and "/resolve/" in r[1]),
                "writes": sum(1 for r in requests if r[0] != "GET" and r[0] != "HEAD")})
            print(f"rebuild: {label}: {entry[label]}", flush=True)
            save()

        rebuild("first")
        rebuild("noop")
        vae = _retouched_vae(folder / "vae-seed0" / "diffusion_pytorch_model.safetensors", folder / "vae-v2.safetensors")
        api.upload_file(path_or_fileobj=vae, path_in_repo="diffusion_pytorch_model.safetensors", repo_id=vae_repo,
                        commit_message="a retouched VAE")
        rebuild("vae")
    finally:
        hub.stop()
        shutil.rmtree(folder, ignore_errors=True)  # the server's storage, downloads, bundles, cache: ~30 GiB at full size


_REBUILD_ROWS = (("first", "first rebuild: full build + validate + publish + tag, empty component cache"),
                 ("noop", "rebuild, nothing changed"),
                 ("vae", "rebuild after a new upstream commit of the VAE repo only (one decoder bias nudged by 1e-4)"))


def render_rebuild(entry: dict[str, Any], latest: str | None, note: Note) -> list[str]:
    if not any(label in entry for label, _ in _REBUILD_ROWS):
        return []
    up = entry.get("upstream", {})
    lines = ["", "## Issue 12: rebuilds of the full-size shapes against the local Hub", "",
             "tests/hub_server.py serves the input above as the upstream base repo (fp16 variant) and the full-size "
             "FP16-fixed VAE (`sdxl-vae-shapes-fp16-fix`) as a substitution repo" + (f" (uploading them took {up['upload_s']:.0f} s)" if "upload_s" in up else "")
             + "; the recipe is bench-sdxl-shapes (int8 UNet, the bench's reduced gate) plus that substitution and a "
             "`publish:` repo, rebuilt with `sdxl-convert rebuild --json`, each run under `/usr/bin/time -v`. "
             "Requests are the server's own log for that run (downloads: GET .../resolve/...).", "",
             "| step | status | exported | from the cache | wall | rebuild's own seconds | peak RSS | requests (downloads / writes) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, text in _REBUILD_ROWS:
        r = entry.get(label)
        if r is None:
            continue
        status = r["status"] + (f" ({r['message']})" if r["status"] != "rebuilt" and r.get("message") else "")
        lines.append(f"| {text} | {status} | {', '.join(r['exported']) or '-'} | {', '.join(r['reused']) or '-'} | "
                     f"{r['wall_s']:.1f} s | {r['seconds'] if r['seconds'] is not None else '-'} s | {r['max_rss_gib']:.2f} GiB | "
                     f"{r['requests']} ({r['downloads']} / {r['writes']}) |")
    return lines + note({k: v for k, v in entry.items() if isinstance(v, dict)}, latest)


WORKERS: dict[str, Callable[..., None]] = {"_gate_capture": _gate_capture, "_gate": _gate, "_sf_parity": _sf_parity}


def step_runner(results: dict[str, Any], lay: Layout, save: Save) -> None:
    """scripts/runner_sim.py: the flagship-shaped rebuild inside a 14 GiB memory cgroup on a 14 GB disk (root only)."""
    import argparse

    import runner_sim

    if os.geteuid() != 0:
        print("runner: skipped: needs root (a memory cgroup and a loop mount)")
        return
    args = argparse.Namespace(input=str(lay.source), work=str(lay.bench / "runner-sim"), memory_gib=14.0, disk_gb=14.0,
                              cgroup="sdxl-runner-sim", keep=False)
    steps = runner_sim.run(args)
    results["runner"] = stamped({"memory_gib": args.memory_gib, "disk_gb": args.disk_gb,
                                 "steps": [asdict(s) for s in steps]})
    save()


def render_runner(entry: dict[str, Any], latest: str | None, note: Note) -> list[str]:
    if not entry.get("steps"):
        return []
    import runner_sim

    steps = [runner_sim.Step(**s) for s in entry["steps"]]
    lines = ["", "## Issue 18: the scheduled-rebuild runner, simulated", "",
             f"`scripts/runner_sim.py` (`just bench --steps runner`, root): GitHub's `ubuntu-24.04` runner has 16 GB of RAM "
             f"(~2 GB taken by the runner) and 14 GB of disk, so the flagship-shaped rebuild "
             f"(recipes/bench-sdxl-fp16fix-shapes.yaml: sdxl-fp16fix's settings and its own gate at 1024x1024, Hub sources "
             f"served by tests/hub_server.py) runs inside a cgroup v1 memory group limited to {entry['memory_gib']:g} GiB "
             f"(no swap) with the Hugging Face cache, the artifacts and the component cache on a {entry['disk_gb']:g} GB "
             f"loop-mounted ext4. Peak RSS: `/usr/bin/time -v`; cgroup peak: `memory.max_usage_in_bytes` (RSS plus the page "
             f"cache charged to the group, which the kernel reclaims before it kills); peak disk: sampled every second.", "",
             *runner_sim.table(steps, entry["memory_gib"], entry["disk_gb"])]
    if entry.get("code"):
        lines += ["", f"Code measured: {entry['code']}."]
    return lines + note({"runner": entry}, latest)
