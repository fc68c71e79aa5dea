"""Cross-check the ACTIVATIONS_SCALE_FACTOR rewrite under real f16 against its f16 emulation, per factor.

Real f16 needs a CPU with avx512_fp16/AMX-FP16 (the device machine's Xeon: see
/work/shared/notes/device.md). That machine has no diffusers, so the work is split:

    python scripts/scale_crosscheck.py prepare build/scale_check   # here: tiny overflow VAE decoder IR + latents
    python scripts/scale_crosscheck.py run build/scale_check        # there (with openvino on PYTHONPATH)

`run` rewrites the IR for each factor (validate/activation_scaling.py), runs it with
INFERENCE_PRECISION_HINT=f16 (checked to really compute f16) and emulated f16, and writes
cross_check.json ($OUT or the folder): non-finite counts and PSNR vs f32 for both, and
their PSNR against each other. The verdicts must agree factor by factor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FACTORS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 1024.0, 16384.0)


def prepare(folder: Path) -> None:
    import numpy as np
    import openvino as ov

    from convert.testing.sdxl import build_overflow_vae
    from validate.checks import _convert_original
    from validate.inputs import encode_images, sample_images

    folder.mkdir(parents=True, exist_ok=True)
    vae = build_overflow_vae("tiny")
    ov.save_model(_convert_original(vae, "vae_decoder"), folder / "decoder.xml", compress_to_fp16=True)
    np.save(folder / "latents.npy", encode_images(vae, sample_images(["astronaut", "chelsea"], 128)))


def run(folder: Path) -> dict:
    import numpy as np
    import openvino as ov

    from validate.activation_scaling import scale_activations
    from validate.metrics import psnr
    from validate.precision import Runner, emulate, measured_precision, with_static_shapes

    core = ov.Core()
    model = core.read_model(folder / "decoder.xml")
    latents = np.load(folder / "latents.npy")
    result: dict = {"cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
                    "f16_computes": measured_precision(core, "CPU", "f16"), "rows": []}

    def infer(m: ov.Model, hint: str, extra: dict | None = None) -> np.ndarray:
        outs = []
        for i in range(len(latents)):
            x = {"latent_sample": latents[i : i + 1]}
            compiled = core.compile_model(with_static_shapes(m, x), "CPU", {"INFERENCE_PRECISION_HINT": hint})
            outs.append(next(iter(Runner(compiled, extra or {})(x).values())))
        return np.concatenate(outs)

    reference = infer(model, "f32")
    for factor in FACTORS:
        scaled = scale_activations(model, factor).model
        started = time.monotonic()
        real = infer(scaled, "f16")
        emulated_model = emulate(scaled, "f16")
        emulated = infer(emulated_model.model, "f32", dict(emulated_model.extra_inputs))
        row: dict = {"factor": factor, "seconds": round(time.monotonic() - started, 2)}
        for name, y in (("real_f16", real), ("emulated_f16", emulated)):
            bad = int(np.count_nonzero(~np.isfinite(y)))
            row[name] = {"non_finite": bad, "total": int(y.size),
                         "psnr_db": None if bad else round(float(psnr(y, reference, 2.0)), 2)}
        finite = not (row["real_f16"]["non_finite"] or row["emulated_f16"]["non_finite"])
        row["real_vs_emulated_psnr_db"] = round(float(psnr(real, emulated, 2.0)), 2) if finite else None
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.folder)
        return
    result = run(args.folder)
    out = Path(os.environ.get("OUT", args.folder)) / "cross_check.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
