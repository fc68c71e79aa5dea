"""Full-size f32 vs emulated-f16 cost on the device machine's Xeon, natively and limited to AVX2 code.

The dev machines cannot hold a full-size SDXL UNet compiled at f32 beside its emulated twin, and
none is AVX2-only; the device machine (16 cores, 128 GiB, AVX-512) can, and ONEDNN_MAX_CPU_ISA=AVX2
limits OpenVINO's JIT to AVX2 code there (faithful for these f32-hint compiles; see
scripts/emulation_cost.py). Builds the SDXL-shaped UNet (fp16 weights, seeded) and the FP16-fixed
VAE decoder from convert/testing, then times each (part, ISA, form) in its own process.

On the device (see ../shared/notes/device.md; wheels in the git-ignored .device/wheels):
    python3 scripts/device_isa_cost.py all "$OUT" [native|AVX2]... [PART]...
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / ".device" / "site"
sys.path[:0] = [str(SITE), str(ROOT)]

SHAPES = {"unet": 128, "vae_decoder": 128, "vae_encoder": 1024}  # latent side 128 / image side 1024: 1024x1024
# (full-size text encoders are left out: torch.jit tracing of the bare CLIP towers fails with transformers 5;
# the project exports them through optimum's patched tracing, which this script does not reproduce)


def setup() -> None:
    if not (SITE / "openvino").is_dir():
        wheels = sorted(str(p) for p in (ROOT / ".device" / "wheels").glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(SITE), *wheels], check=True)


def build(out: Path) -> None:
    """Full-size IRs with fp16 weights: the UNet traced at a small latent and reshaped at compile."""
    import openvino as ov
    import torch

    from convert.testing.sdxl import (_PIPELINE_SHAPES, _pipeline_unet_config, _seeded, build_overflow_vae,
                                      fix_vae_for_fp16)

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "vae_decoder.xml").exists():
        vae = fix_vae_for_fp16(build_overflow_vae("full", 0)).eval()

        class Decoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.vae = vae

            def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
                return self.vae.decode(latent_sample).sample

        with torch.no_grad():
            model = ov.convert_model(Decoder(), example_input=torch.randn(1, 4, 16, 16),
                                     input=[("latent_sample", [-1, 4, -1, -1])])
        ov.save_model(model, out / "vae_decoder.xml")
        del vae, model
    if not (out / "vae_encoder.xml").exists():
        vae = fix_vae_for_fp16(build_overflow_vae("full", 0)).eval()

        class Encoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.vae = vae

            def forward(self, sample: torch.Tensor) -> torch.Tensor:
                return self.vae.encode(sample).latent_dist.mean

        with torch.no_grad():
            model = ov.convert_model(Encoder(), example_input=torch.randn(1, 3, 128, 128),
                                     input=[("sample", [-1, 3, -1, -1])])
        ov.save_model(model, out / "vae_encoder.xml")
        del vae, model
    if not (out / "unet.xml").exists():
        from diffusers import UNet2DConditionModel

        config = _pipeline_unet_config(_PIPELINE_SHAPES["full"])
        unet = _seeded(lambda: UNet2DConditionModel(**config), "unet", 0, torch.float32).eval()

        class Unet(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet = unet

            def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):  # type: ignore[no-untyped-def]
                cond = {"text_embeds": text_embeds, "time_ids": time_ids}
                return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond).sample

        example = _unet_inputs(16)
        with torch.no_grad():
            model = ov.convert_model(Unet(), example_input={k: torch.from_numpy(v) for k, v in example.items()})
        for port, name in zip(model.inputs, example, strict=True):
            port.get_tensor().set_names({name})
        ov.save_model(model, out / "unet.xml")  # weights compressed to fp16


def _unet_inputs(side: int) -> dict:  # type: ignore[type-arg]
    import numpy as np

    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((2, 4, side, side)).astype(np.float32),
            "timestep": np.array([500], np.int64),
            "encoder_hidden_states": rng.standard_normal((2, 77, 2048)).astype(np.float32),
            "text_embeds": rng.standard_normal((2, 1280)).astype(np.float32),
            "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024]] * 2, np.float32)}


def measure(xml: Path, part: str, form: str) -> dict:  # type: ignore[type-arg]
    """One configuration in this process: compile and two runs, peak RSS."""
    import numpy as np
    import openvino as ov

    from validate.host import compile_on_host, cpu_isa
    from validate.precision import emulate, with_static_shapes

    core = ov.Core()
    model = core.read_model(xml)
    side = SHAPES[part]
    rng = np.random.default_rng(0)
    feed = {"unet": lambda: _unet_inputs(side),
            "vae_decoder": lambda: {"latent_sample": rng.standard_normal((1, 4, side, side)).astype(np.float32)},
            "vae_encoder": lambda: {"sample": rng.uniform(-1, 1, (1, 3, side, side)).astype(np.float32)},
            }[part]()
    extra: dict = {}  # type: ignore[type-arg]
    if form != "f32":
        emulated = emulate(model, "f16")
        model, extra = emulated.model, dict(emulated.extra_inputs)
    start = time.perf_counter()
    host = compile_on_host(core, with_static_shapes(model, feed), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    compile_s = time.perf_counter() - start
    request = host.compiled.create_infer_request()
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        request.infer({**feed, **extra})
        runs.append(time.perf_counter() - start)
    out = request.get_output_tensor(0).data
    return {"part": part, "form": form, "isa": cpu_isa().describe(), "compiled_as": host.fallback or "as given",
            "compile_s": round(compile_s, 1), "run_s": round(min(runs), 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "non_finite": int(np.count_nonzero(~np.isfinite(out)))}


def run_all(out: Path, isas: list[str | None], parts: list[str]) -> None:
    setup()
    models = ROOT / ".device" / "models"  # kept on the machine between calls; too big to come back in $OUT
    subprocess.run([sys.executable, __file__, "build", str(models)], check=True)
    rows = []
    for isa in isas:
        for part in parts:
            for form in ("f32", "f16"):
                env = {**os.environ} | ({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})
                done = subprocess.run([sys.executable, __file__, "measure", str(models / f"{part}.xml"), part, form],
                                      env=env, capture_output=True, text=True)
                row = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                       else {"part": part, "form": form, "isa": isa or "native", "error": done.stderr[-400:]})
                rows.append(row)
                print(json.dumps(row), flush=True)
                (out / "device_isa_cost.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "build":
        build(Path(sys.argv[2]))
    elif command == "measure":
        print(json.dumps(measure(Path(sys.argv[2]), sys.argv[3], sys.argv[4])))
    else:
        wanted = [a for a in sys.argv[3:] if a not in SHAPES] or ["native", "AVX2"]
        parts = [a for a in sys.argv[3:] if a in SHAPES] or list(SHAPES)
        run_all(Path(sys.argv[2]), [None if isa == "native" else isa for isa in wanted], parts)
