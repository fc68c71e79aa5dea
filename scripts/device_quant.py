"""Issue 21 on the device Xeon (AMX): full-size SDXL UNet (seeded, the sdxl-base-shapes architecture), one step
at 1024x1024 (batch 2) per precision / quantization. Usage: python scripts/device_quant.py build | time VARIANT HINT | quant MODE"""
import sys, time, json, os
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / ".site"), str(ROOT)]
import numpy as np
OUT = ROOT / ".device" / "models"
OUT.mkdir(parents=True, exist_ok=True)


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
    data = np.load(ROOT / ".device" / "calib" / "calibration.npz")
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
    for _ in range(3):
        t = time.time(); request.infer(x); runs.append(time.time() - t)
    out = np.asarray(request.get_output_tensor(0).data, np.float64).ravel()
    ref_file = OUT / "ref.npy"
    if variant == "f32" and hint == "f32":
        np.save(ref_file, out)
    cos = None
    if ref_file.exists():
        ref = np.load(ref_file); cos = round(float(out @ ref / np.linalg.norm(out) / np.linalg.norm(ref)), 6)
    return {"variant": variant, "hint": hint, "compile_s": round(compile_s, 1), "runs_s": [round(r, 2) for r in runs],
            "cosine_vs_f32": cos}


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "build":
        r = build()
    elif cmd == "quant":
        r = quant(sys.argv[2])
    else:
        r = timed(sys.argv[2], sys.argv[3])
    print("RESULT", json.dumps({**r, "peak_rss_gib": peak(), "cpu": os.cpu_count()}), flush=True)
