"""Issue 21 on the device Xeon (AMX): full-size SDXL UNet (seeded, the sdxl-base-shapes architecture), one step
at 1024x1024 (batch 2) per precision / quantization. Usage: python scripts/device_quant.py build | time VARIANT HINT | quant MODE (on the device);
store RUNS.json (here: the RESULT lines gathered into BENCHMARKS.json's notes and BENCHMARKS.md)"""
import sys, time, json, os
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script (on the device): its wheels, then the project; imported (tests): nothing
    sys.path[:0] = [str(ROOT / ".device" / "site"), str(ROOT)]  # .device/ is git-ignored: kept between calls
import numpy as np
OUT = ROOT / ".device" / "models"


def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)


def inputs(size=128, batch=2):
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((batch, 4, size, size), dtype=np.float32), "timestep": np.array([500], np.int64),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 2048), dtype=np.float32),
            "text_embeds": rng.standard_normal((batch, 1280), dtype=np.float32),
            "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024]] * batch, np.float32)}


def samples():
    """The UNet calls recorded here (bench_quant.py calibrate) when sent along; otherwise 4 synthetic calls of the
    same shapes (a 256x256 latent, batch 2, spread timesteps): the weights are seeded, so only timing is measured."""
    path = ROOT / ".device" / "calib" / "calibration.npz"
    if not path.exists():
        calls = []
        for i, t in enumerate((999, 749, 499, 249)):
            x = inputs(32)
            rng = np.random.default_rng(100 + i)
            x["sample"] = rng.standard_normal(x["sample"].shape, dtype=np.float32)
            x["timestep"] = np.array([t], np.int64)
            x["time_ids"] = np.array([[256, 256, 0, 0, 256, 256]] * 2, np.float32)
            calls.append(x)
        return calls
    data = np.load(path)
    out = {}
    for key in data.files:
        i, name = key.split("/", 1)
        out.setdefault(int(i), {})[name] = data[key]
    return [out[i] for i in sorted(out)]


def build():
    import torch, openvino as ov
    from convert.testing.sdxl import _PIPELINE_SHAPES, _pipeline_unet_config, _seeded
    from diffusers import UNet2DConditionModel
    t = time.time()
    unet = _seeded(lambda: UNet2DConditionModel(**_pipeline_unet_config(_PIPELINE_SHAPES[os.environ.get("QB_SHAPE", "full")])), "unet", 0, torch.float32)
    built = time.time() - t

    class Wrap(torch.nn.Module):
        def __init__(self, u):
            super().__init__(); self.unet = u
        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            return self.unet(sample, timestep, encoder_hidden_states,
                             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]
    x = {k: torch.from_numpy(v) for k, v in inputs(32).items()}
    t = time.time()
    with torch.no_grad():
        model = ov.convert_model(Wrap(unet).eval(), example_input=x)
    for port, name in zip(model.inputs, x):
        port.get_tensor().set_names({name})
    ov.save_model(model, OUT / "unet_f32.xml", compress_to_fp16=False)
    return {"params_b": round(sum(p.numel() for p in unet.parameters()) / 1e9, 3), "build_s": round(built, 1),
            "convert_s": round(time.time() - t, 1)}


def quant(mode):
    import nncf, openvino as ov
    core = ov.Core()
    model = core.read_model(OUT / "unet_f32.xml")
    t = time.time()
    data = nncf.Dataset(samples())
    adv = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.DISABLE)
    if mode == "weights":
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    elif mode == "hybrid":  # optimum-intel's hybrid configs, as convert/optimum_compat.py builds them
        weighted = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
                    and any(op.input_value(i).get_node().get_type_name() in ("Constant", "Convert") for i in (0, 1))]
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        adv.smooth_quant_alphas.matmul = -1
        model = nncf.quantize(model, data, preset=nncf.QuantizationPreset.MIXED, subset_size=4, fast_bias_correction=True,
                              model_type=nncf.ModelType.TRANSFORMER, ignored_scope=nncf.IgnoredScope(names=weighted),
                              advanced_parameters=adv)
    else:  # full, first and last convolution kept (convert/quantize.py)
        convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
        model = nncf.quantize(model, data, preset=nncf.QuantizationPreset.MIXED, subset_size=4, fast_bias_correction=True,
                              model_type=nncf.ModelType.TRANSFORMER,
                              ignored_scope=nncf.IgnoredScope(names=[convs[0], convs[-1]]), advanced_parameters=adv)
    seconds = time.time() - t
    ov.save_model(model, OUT / f"unet_{mode}.xml", compress_to_fp16=False)
    return {"quantize_s": round(seconds, 1), "ir_gib": round((OUT / f"unet_{mode}.bin").stat().st_size / 2**30, 2)}


def product(mode):
    """The product's own quantize_model (convert/quantize.py: in pieces above 1 GiB of f32 weights)."""
    import openvino as ov
    from convert.quantize import quantize_model
    from convert.recipe import ComponentSettings, QuantizationSettings
    model = ov.Core().read_model(OUT / "unet_f32.xml")
    t = time.time()
    quantized = quantize_model(model, QuantizationSettings(mode=mode), ComponentSettings(weights="int8"), samples(),
                               notify=lambda line: print(line, flush=True))
    seconds = time.time() - t
    ov.save_model(quantized, OUT / f"unet_product_{mode}.xml", compress_to_fp16=False)
    return {"quantize_s": round(seconds, 1), "ir_gib": round((OUT / f"unet_product_{mode}.bin").stat().st_size / 2**30, 2)}


def timed(variant, hint):
    import openvino as ov
    core = ov.Core()
    model = core.read_model(OUT / f"unet_{variant}.xml")
    t = time.time()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    compile_s = time.time() - t
    request = compiled.create_infer_request()
    runs = []
    x = inputs()
    for _ in range(int(os.environ.get("QB_RUNS", "3"))):
        t = time.time(); request.infer(x); runs.append(time.time() - t)
    out = np.asarray(request.get_output_tensor(0).data, np.float64).ravel()
    np.save(OUT / f"out_{variant}_{hint}.npy", out.astype(np.float32))  # for comparisons between variants later
    ref_file = OUT / "ref.npy"
    if variant == "f32" and hint == "f32":
        np.save(ref_file, out)
    cos = None
    if ref_file.exists():
        ref = np.load(ref_file); cos = round(float(out @ ref / np.linalg.norm(out) / np.linalg.norm(ref)), 6)
    return {"variant": variant, "hint": hint, "compile_s": round(compile_s, 1), "runs_s": [round(r, 2) for r in runs],
            "cosine_vs_f32": cos}


def _steady(rows):
    """Every call after a process's first (its first includes one-off allocations)."""
    return [t for r in rows for t in r["runs_s"][1:]]


def render(data):
    """BENCHMARKS.md's device section from the RESULT lines gathered into one JSON file (kept in BENCHMARKS.json)."""
    import statistics
    by = {}
    for r in data["time"]:
        by.setdefault((r["variant"], r["hint"]), []).append(r)
    med = {k: statistics.median(_steady(v)) for k, v in by.items()}
    names = {"f32": "f32 IR", "weights": "int8 weights (INT8_ASYM)", "hybrid": "int8 hybrid (optimum's configs)",
             "full": "int8 full (weights + activations)"}
    rows = ["| UNet | hint | processes x steady calls | UNet step, median (range) | vs f32 | vs int8 weights | compile | "
            "cosine vs f32 | peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for (variant, hint), rs in by.items():
        calls = _steady(rs)
        m = med[(variant, hint)]
        rows.append(f"| {names[variant]} | {hint} | {len(rs)} x {len(rs[0]['runs_s']) - 1} | {m:.2f} s "
                    f"({min(calls):.2f}-{max(calls):.2f}) | {med[('f32', 'f32')] / m:.2f}x | "
                    f"{med[('weights', 'bf16')] / m:.2f}x | {statistics.median(r['compile_s'] for r in rs)} s | "
                    f"{rs[0]['cosine_vs_f32']} | {max(r['peak_rss_gib'] for r in rs)} GiB |")
    q = data["quantize"]
    prep = ["", "| preparation | seconds | IR size | peak RSS | bytes per parameter |", "|---|---|---|---|---|",
            f"| build + convert (seeded UNet, f32 IR) | {data['build']['build_s'] + data['build']['convert_s']:.1f} | - | "
            f"{data['build']['peak_rss_gib']} GiB | - |"]
    for mode, r in q.items():
        prep.append(f"| quantize {mode} | {r['quantize_s']} | {r['ir_gib']} GiB | {r['peak_rss_gib']} GiB | "
                    f"{r['peak_rss_gib'] * 2**30 / (data['build']['params_b'] * 1e9):.2f} |")
    pairs = [round(statistics.median(w["runs_s"][1:]) / statistics.median(f["runs_s"][1:]), 2)
             for w, f in zip(by[("weights", "bf16")], by[("full", "bf16")])]
    text = [
        f"The device machine's host CPU ({data['machine']}), `scripts/device_quant.py`: the same full-size SDXL UNet "
        "architecture (2.567 B parameters, seeded weights built there: a full-size IR is too big to send), exported at "
        "f32 as the product exports a denoiser it quantizes, then int8 by the same NNCF calls with the parameters "
        "`convert/quantize.py` passes (optimum-intel's configs; full: first and last convolution kept, SmoothQuant, "
        "fast bias correction). Calibration: 4 synthetic UNet calls of the calibration shapes (256x256, batch 2, "
        "timesteps 999-249; the pipeline run that records real calls needs the full pipeline, which was not sent). One "
        "step = one UNet call at 1024x1024 (batch 2), timed in its own process after a first call; the processes were "
        "interleaved in 4 rounds because the machine's timings drift by up to 30 % from call to call.",
        "", *rows, *prep, "",
        f"On this Xeon full int8 runs a UNet step {med[('weights', 'bf16')] / med[('full', 'bf16')]:.2f}x faster than "
        f"weight-only int8 (medians; per round {', '.join(f'{x}x' for x in pairs)}) and "
        f"{med[('f32', 'bf16')] / med[('full', 'bf16')]:.2f}x faster than bf16, "
        f"{med[('f32', 'f32')] / med[('full', 'bf16')]:.2f}x faster than f32; hybrid gains nothing over weight-only "
        "int8 here (its int8 MatMuls are a small share of the step; the convolutions stay bf16). Its step output "
        f"stays at cosine {by[('full', 'bf16')][0]['cosine_vs_f32']} vs f32 on seeded weights (a check that nothing "
        "broke; the image quality per mode is measured on the tiny pipelines above, where full int8 passes the gate "
        "at SSIM 0.986-0.987). bf16 compute alone is "
        f"{med[('f32', 'f32')] / med[('f32', 'bf16')]:.2f}x faster than f32 on AMX. The VAE decode at bf16 vs f32 is "
        "timed in the section on optimum-intel below (3.0x faster at bf16).",
        "",
        f"Memory: `nncf.quantize` given the whole UNet for full int8 peaked at {q['full']['peak_rss_gib']} GiB "
        f"({q['full']['peak_rss_gib'] * 2**30 / (data['build']['params_b'] * 1e9):.1f} bytes per parameter, "
        f"{q['full']['quantize_s'] / 60:.1f} min on 16 cores), hybrid at {q['hybrid']['peak_rss_gib']} GiB: more than "
        "the 12 GiB limit of issue 18 and than a 24 GiB machine (the OOM kills on the 2-core EPYC above). So the product "
        "quantizes a denoiser this big in pieces (next section: 6.66 GiB), and `--plan` counts these bytes per "
        "parameter for one piece (convert/budget.py `QUANTIZE_PER_PARAM`). optimum-intel's own full int8 of the "
        "same UNet is timed against ours in the section \"Issue 21: our full int8 against optimum-intel's\" below.",
    ]
    return "\n".join(text)


def render_pieces(data):
    """BENCHMARKS.md's section on full int8 in pieces, measured on the dev VM with the product's quantize_model."""
    import statistics
    by = {}
    for r in data["time"]:
        by.setdefault(r["variant"], []).append(r)
    med = {k: statistics.median(_steady(v)) for k, v in by.items()}
    names = {"f32": "f32 IR", "weights": "int8 weights (INT8_ASYM)", "product_full": "int8 full, quantized in pieces"}
    cos = data["cosine_vs_f32_ir_at_bf16"]
    rows = ["| UNet (bf16 hint) | steady calls | UNet step, median (range) | vs f32 IR | vs int8 weights | compile | "
            "cosine vs f32 IR at bf16 | peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for variant in ("f32", "weights", "product_full"):
        calls = _steady(by[variant])
        rows.append(f"| {names[variant]} | {len(calls)} | {med[variant]:.2f} s ({min(calls):.2f}-{max(calls):.2f}) | "
                    f"{med['f32'] / med[variant]:.2f}x | {med['weights'] / med[variant]:.2f}x | "
                    f"{round(statistics.median(r['compile_s'] for r in by[variant]), 1)} s | {cos.get(variant, 1.0)} | "
                    f"{max(r['peak_rss_gib'] for r in by[variant])} GiB |")
    q = data["quantize"]
    prep = ["", "| preparation | seconds | IR size | peak RSS | how |", "|---|---|---|---|---|",
            f"| build + convert (seeded UNet, f32 IR) | {data['build']['build_s'] + data['build']['convert_s']:.1f} | "
            f"- | {data['build']['peak_rss_gib']} GiB | `scripts/device_quant.py build` |"]
    for mode, r in q.items():
        prep.append(f"| quantize {mode} | {r['quantize_s']} | {r['ir_gib']} GiB | {r['peak_rss_gib']} GiB | {r['how']} |")
    return "\n".join([
        f"Full int8 of the full-size SDXL UNet within the memory limit. On {data['machine']}: the seeded 2.567 B-parameter "
        "UNet exported at f32 (as for the device rows) was quantized by the product's own `convert.quantize."
        "quantize_model` (`scripts/device_quant.py product full`), which quantizes a denoiser with more than 1 GiB "
        "of f32 weights in pieces (`convert/quantize_pieces.py`: the gate's sequential pieces, each calibrated on the "
        "values the unquantized model hands it, quantized with the same NNCF parameters, joined back into one model). "
        "Calibration: the same 4 synthetic calls as on the device. Then one UNet step at 1024x1024 (batch 2) per "
        "variant, timed back to back in separate processes; cosine of each step output vs the f32 IR's at bf16 "
        "(the f32-compute reference needs ~21 GiB compiled whole).",
        "", *rows, *prep, "",
        f"In pieces, full int8 of the SDXL UNet peaked at **{q['full']['peak_rss_gib']} GiB** ({q['full']['pieces']} "
        f"pieces, {q['full']['quantize_s'] / 60:.1f} min on 2 cores, the test suite sharing them for most of it) where NNCF given "
        "the whole model took 36.44 GiB on the Xeon and was OOM-killed here; the quantized UNet runs a step "
        f"{med['weights'] / med['product_full']:.2f}x faster than weight-only int8 and {med['f32'] / med['product_full']:.2f}x "
        "faster than bf16 on this CPU (VNNI), at step cosine "
        f"{cos['product_full']} (the Xeon's whole-model full int8: 0.994). tests/test_quantize.py shows on the tiny "
        "UNet that the joined pieces compute exactly what the model computes when nothing is quantized, and that "
        "quantized in 3 pieces they stay within 0.002 cosine of the whole-model quantization (full and hybrid). The "
        "rows of the first table of this issue (\"Issue 21: bf16 and int8 activations at full size\") were measured "
        "on another day, on an fp16-weight IR, and are about 2x slower across the board (bf16 34.3 s vs 16.3 s here); "
        "compare rows within one table.",
    ])


def store(path, key="issue21-device"):
    """Write the device section into BENCHMARKS.json's notes and re-render BENCHMARKS.md."""
    import subprocess
    bench = ROOT / "BENCHMARKS.json"
    results = json.loads(bench.read_text())
    notes = results.setdefault("notes", {})
    data = json.loads(Path(path).read_text()) if path else notes[key]["data"]
    if key == "issue21-pieces":
        notes[key] = {"title": "Issue 21: full int8 of the full-size UNet in pieces (this machine)",
                      "markdown": render_pieces(data), "measured_at": data["measured_at"], "data": data}
    else:
        notes[key] = {"title": "Issue 21 on the device Xeon (AMX, 16 cores)", "markdown": render(data),
                      "measured_at": data["measured_at"], "data": data}
    bench.write_text(json.dumps(results, indent=2) + "\n")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--render-only"], check=True)


if __name__ == "__main__":
    cmd = sys.argv[1]
    OUT.mkdir(parents=True, exist_ok=True)
    if cmd == "store":  # on the dev machine: python scripts/device_quant.py store RUNS.json (the RESULT lines gathered)
        # store [RUNS.json] [issue21-device | issue21-pieces]
        store(sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None, *sys.argv[3:4])
        sys.exit(0)
    if cmd == "build":
        r = build()
    elif cmd == "product":
        r = product(sys.argv[2])
    elif cmd == "quant":
        r = quant(sys.argv[2])
    else:
        r = timed(sys.argv[2], sys.argv[3])
    print("RESULT", json.dumps({**r, "peak_rss_gib": peak(), "cpu": os.cpu_count()}), flush=True)
