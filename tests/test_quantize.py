"""int8 activations for the denoiser (issue 21): calibrated on the exported pipeline's own f32 run,
judged against the unquantized IR, and refused when it destroys the images.

`tiny-sdxl-int8-full` (full int8 UNet, CPU target at bf16 and f32) is built once; a second build
quantizes the activation-outlier UNet without SmoothQuant and must fail the gate."""

from __future__ import annotations

import contextlib
import gc
import io
import json
from pathlib import Path

import numpy as np
import pytest

from convert.cli import main
from convert.recipe import load_recipe
from convert.workspace import PROJECT_ROOT

RECIPE = PROJECT_ROOT / "recipes" / "tiny-sdxl-int8-full.yaml"


@pytest.fixture(scope="module")
def full_int8(artifacts_root: Path):  # type: ignore[no-untyped-def]  # -> convert.build.BuildResult
    from convert.build import build
    from convert.workspace import Workspace

    return build(RECIPE, Workspace(artifacts=artifacts_root))


def _ops(xml: Path) -> dict[str, int]:
    import openvino as ov

    counts: dict[str, int] = {}
    for op in ov.Core().read_model(xml).get_ops():
        counts[op.get_type_name()] = counts.get(op.get_type_name(), 0) + 1
    return counts


def test_the_full_int8_unet_passes_the_gate_against_its_unquantized_self(full_int8) -> None:  # type: ignore[no-untyped-def]
    report = json.loads((full_int8.bundle / "validation" / "report.json").read_text())
    assert report["passed"] is True
    (record,) = report["quantization"]
    # 4 prompts x 3 steps, one call per step (the batch of 2 is one call)
    assert record["part"] == "unet" and record["mode"] == "full" and record["samples"] == 12 and record["prompts"] == 4
    unet = [r for r in report["submodels"] if r["component"] == "unet"]
    assert {r["precision"] for r in unet} == {"bf16", "f32"}
    for row in unet:  # compared with the unquantized IR: the quantization shows, within the mode's floor
        assert row["quantized"] == "int8 full" and 0.95 <= row["min_cosine"] < 0.9999, row
    images = report["end_to_end"]["images"]
    assert {r["precision"] for r in images} == {"bf16", "f32"}  # a quantized bundle at f32 is judged too
    assert report["end_to_end"]["thresholds"]["min_ssim"] == 0.85
    assert report["end_to_end"]["thresholds"]["min_psnr_db"] == 30.0
    assert all(0.85 <= r["ssim"] < 1.0 and r["invalid"] == 0 for r in images)
    assert all("int8 full" in r["runs_as"]["unet"] for r in images)


def test_the_shipped_unet_computes_in_int8_and_the_unquantized_one_stays_out(full_int8) -> None:  # type: ignore[no-untyped-def]
    ops = _ops(full_int8.bundle / "unet" / "openvino_model.xml")
    assert ops.get("FakeQuantize", 0) > 20, ops  # activations quantized at the convolutions and MatMuls
    shipped = {p.relative_to(full_int8.bundle).as_posix() for p in full_int8.bundle.rglob("*.xml")}
    assert "unet/openvino_model.xml" in shipped and not any("reference" in p for p in shipped)
    build_json = json.loads((full_int8.bundle / "build.json").read_text())
    unet = next(c for c in build_json["components"] if c["name"] == "unet")
    assert unet["weights"] == "int8 full (weights + activations)"
    assert "int8 full (weights + activations)" in (full_int8.bundle / "README.md").read_text()


def test_a_second_convert_reuses_it_and_verify_passes(full_int8, artifacts_root: Path) -> None:  # type: ignore[no-untyped-def]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["--artifacts", str(artifacts_root), "--json", "convert", str(RECIPE)]) == 0
    again = json.loads(buffer.getvalue()[buffer.getvalue().index("{"):])
    assert again["status"] == "reused" and Path(again["bundle"]) == full_int8.bundle
    assert main(["verify", str(full_int8.bundle)]) == 0


def test_optimum_intel_and_openvino_genai_generate_with_it(full_int8) -> None:  # type: ignore[no-untyped-def]
    import openvino_genai
    import optimum.intel

    pipe = optimum.intel.OVStableDiffusionXLPipeline.from_pretrained(full_int8.bundle, device="CPU")
    images = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                  output_type="np", generator=np.random.RandomState(0)).images
    del pipe
    genai = openvino_genai.Text2ImagePipeline(str(full_int8.bundle), "CPU")
    image = np.array(genai.generate("a photo of a cat", width=64, height=64, num_inference_steps=2).data)
    del genai  # its worker threads must not outlive the test: test_faults signals this process later
    gc.collect()
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0
    assert image.shape == (1, 64, 64, 3) and image.std() > 0


BAD = RECIPE.read_text().replace("name: tiny-sdxl-int8-full", "name: tiny-sdxl-int8-outliers").replace(
    "substitutions:\n",
    "substitutions:\n  unet: {source: {generated: {generator: tiny-sdxl-unet-activation-outliers, seed: 0}}}\n",
).replace("      mode: full\n", "      mode: full\n      smooth_quant_alpha: -1\n").replace(
    "  denoise_steps: 2\n", "  denoise_steps: 1\n  components: [unet, vae_decoder]\n  check_original: false\n")


def test_a_unet_with_activation_outliers_quantized_without_smoothquant_fails_the_build(
        tmp_path: Path, artifacts_root: Path) -> None:
    """Its f32 (and bf16) output is fine and int8 weights keep it (each row its own scale), but one
    int8 scale per activation tensor flattens every channel beside the outliers."""
    recipe = tmp_path / "tiny-sdxl-int8-outliers.yaml"
    recipe.write_text(BAD)
    assert "smooth_quant_alpha: -1" in BAD and "activation-outliers" in BAD
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["--artifacts", str(artifacts_root), "--json", "convert", str(recipe)])
    # the JSON document is the last line: NNCF's log handler and progress bars write to the sys.stdout of
    # their import, which in-process here is this buffer (the CLI's own run sends them to the build log)
    payload = json.loads(buffer.getvalue().strip().splitlines()[-1])
    assert code == 6, payload
    failures = payload["failures"]
    cosine = [f for f in failures if f.startswith("unet f32 (int8 full): cosine similarity")]
    assert cosine and "vs the unquantized IR at f32" in cosine[0] and "smooth_quant_alpha" in cosine[0], failures
    images = [f for f in failures if f.startswith("end-to-end")]
    assert images and all("the int8 full unet changed the image" in f for f in images), failures
    moved = Path(payload["moved_to"])
    assert moved.parent == artifacts_root / "broken" and not (artifacts_root / "tiny-sdxl-int8-outliers").exists()


def _recipe_error(tmp_path: Path, components: str, extra: str = "") -> str:
    path = tmp_path / "r.yaml"
    path.write_text("schema_version: 1\nname: r\nbase: {generated: {generator: tiny-sdxl-base}}\n"
                    f"components:\n{components}\n{extra}")
    from convert.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    return str(e.value)


@pytest.mark.parametrize(("components", "extra", "message"), [
    ("  unet: {weights: fp16, quantization: {mode: full}}", "", "set weights: int8 (not fp16)"),
    ("  text_encoder: {weights: int8, quantization: {mode: hybrid}}", "", "in the denoiser (unet) only"),
    ("  unet: {weights: int8, quantization: {mode: full}}", "validation: {end_to_end: {prompts: []}}",
     "validation.end_to_end.prompts cannot be empty"),
    ("  unet: {weights: int8, quantization: {mode: hybrid, smooth_quant_alpha: 0.5}}", "", "mode full only"),
    ("  unet: {weights: int8, quantization: {mode: full, smooth_quant_alpha: 2}}", "", "not a SmoothQuant alpha"),
    ("  unet: {weights: int8, nncf: {mode: int8_sym}, quantization: {mode: full}}", "", "remove nncf"),
    ("  unet: {weights: int8, quantization: {mode: full}}", "validation: {components: [vae_decoder]}",
     "add it to validation.components"),
])  # fmt: skip
def test_quantization_settings_that_cannot_work_are_refused(tmp_path: Path, components: str, extra: str,
                                                            message: str) -> None:
    assert message in _recipe_error(tmp_path, components, extra)


def test_calibration_defaults_come_from_the_repository_list_and_the_gate_run(tmp_path: Path) -> None:
    from convert.quantize import calibration_plan, default_prompts

    prompts = default_prompts()
    assert len(prompts) >= 32 and len(set(prompts)) == len(prompts) and not any(p.startswith("#") for p in prompts)
    recipe = load_recipe(RECIPE)
    quant = recipe.quantized()["unet"]
    assert calibration_plan(recipe, quant, 1024) == (prompts[:4], recipe.run_steps(), 64)
    own = tmp_path / "own.yaml"
    own.write_text(RECIPE.read_text().replace("calibration: {count: 4}",
                                              "calibration: {prompts: [a cat, a dog], count: 8, steps: 2, resolution: 32}"))
    assert calibration_plan(load_recipe(own), load_recipe(own).quantized()["unet"], 1024) == (["a cat", "a dog"], 2, 32)


def test_a_cpu_target_is_gated_at_bf16_and_f32_and_its_card_says_what_runs(full_int8, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """OpenVINO's CPU plugin computes bf16 by default where the CPU has avx512_bf16/AMX, f32 elsewhere:
    a CPU target is gated at both unless the recipe names its own precisions."""
    from convert.recipe import Target

    assert Target(device="CPU").inference_precision == ["bf16", "f32"]
    assert Target(device="GPU").inference_precision == ["f16"]
    assert Target(device="CPU", inference_precision=["f32"]).inference_precision == ["f32"]
    assert load_recipe(RECIPE).target.inference_precision == ["bf16", "f32"]
    card = (full_int8.bundle / "README.md").read_text()
    assert "OpenVINO computes bf16 by default where the CPU has avx512_bf16 or AMX" in card
    assert "gated at bf16, f32" in card and "INFERENCE_PRECISION_HINT" not in card
    report = json.loads((full_int8.bundle / "validation" / "report.json").read_text())
    assert {r["precision"] for r in report["submodels"]} == {"bf16", "f32"}


def test_a_part_judged_at_f32_only_on_a_cpu_target_gets_the_hint_in_the_card() -> None:
    from convert.package import _device_lines

    text = RECIPE.read_text().replace("    weights: int8\n", "    weights: int8\n    inference_precision: [f32]\n", 1)
    recipe = load_recipe_text(text)
    (line, _) = _device_lines(recipe)
    assert "unet was judged at f32 only" in line and '"INFERENCE_PRECISION_HINT": "f32"' in line


def load_recipe_text(text: str):  # type: ignore[no-untyped-def]
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.yaml"
        path.write_text(text)
        return load_recipe(path)


HYBRID = RECIPE.read_text().replace("name: tiny-sdxl-int8-full", "name: tiny-sdxl-int8-hybrid").replace(
    "      mode: full\n      calibration: {count: 4}\n", "      mode: hybrid\n",
).replace("  denoise_steps: 2\n", "  denoise_steps: 1\n  images: [astronaut]\n  components: [unet, vae_decoder]\n"
          "  check_original: false\n  end_to_end: {prompts: [a photo of a cat]}\n")


def test_hybrid_int8_quantizes_the_convolutions_and_compresses_the_matmuls(tmp_path: Path, artifacts_root: Path) -> None:
    """optimum-intel's hybrid mode: MatMul/Gather weights int8 (no activation quantizer in front of them),
    convolutions int8 weights and activations; passes the gate against the unquantized UNet."""
    import openvino as ov

    from convert.build import build
    from convert.workspace import Workspace

    assert "mode: hybrid" in HYBRID and "calibration" not in HYBRID  # the defaults: 8 prompts x the run's 3 steps
    recipe = tmp_path / "tiny-sdxl-int8-hybrid.yaml"
    recipe.write_text(HYBRID)
    result = build(recipe, Workspace(artifacts=artifacts_root))
    report = json.loads((result.bundle / "validation" / "report.json").read_text())
    assert report["passed"] is True and report["quantization"][0]["samples"] == 24  # 8 prompts x 3 steps
    unet = [r for r in report["submodels"] if r["component"] == "unet"]
    assert unet and all(r["quantized"] == "int8 hybrid" and 0.98 <= r["min_cosine"] < 0.99999 for r in unet), unet
    model = ov.Core().read_model(result.bundle / "unet" / "openvino_model.xml")
    fq_consumers: dict[str, int] = {}
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize":
            for target in op.output(0).get_target_inputs():
                kind = target.get_node().get_type_name()
                fq_consumers[kind] = fq_consumers.get(kind, 0) + 1
    assert fq_consumers.get("Convolution", 0) > 10, fq_consumers
    assert fq_consumers.get("MatMul", 0) == 0, fq_consumers  # MatMuls: weight-only int8
    matmul_weights = [op for op in model.get_ops() if op.get_type_name() == "MatMul"
                      and op.input_value(1).get_node().get_type_name() in ("Multiply", "Convert")]
    assert matmul_weights, "MatMul weights should be int8 (decompressed by Convert/Subtract/Multiply)"


def test_the_sd3_transformer_quantizes_fully_and_passes_against_its_unquantized_self(
        tmp_path: Path, artifacts_root: Path) -> None:
    """The quantize stage is the denoiser's, whatever the family names it: SD3's transformer."""
    from convert.build import build
    from convert.workspace import Workspace

    text = (PROJECT_ROOT / "recipes" / "tiny-sd35-medium.yaml").read_text()
    text = text.replace("name: tiny-sd35-medium", "name: tiny-sd35-int8-full").replace(
        "  transformer: {weights: int8, nncf: {mode: int8_asym}}",
        "  transformer: {weights: int8, quantization: {mode: full, calibration: {count: 4}}}").replace(
        "  device: GPU\n  inference_precision: [f16, f32]\n", "  device: CPU\n").replace(
        "  denoise_steps: 2\n", "  denoise_steps: 1\n  images: [astronaut]\n  check_original: false\n"
        "  end_to_end: {prompts: [a photo of a cat]}\n")
    assert "quantization: {mode: full" in text and "device: CPU" in text
    recipe = tmp_path / "tiny-sd35-int8-full.yaml"
    recipe.write_text(text)
    result = build(recipe, Workspace(artifacts=artifacts_root))
    report = json.loads((result.bundle / "validation" / "report.json").read_text())
    assert report["passed"] is True and report["quantization"][0]["part"] == "transformer"
    rows = [r for r in report["submodels"] if r["component"] == "transformer"]
    assert {r["precision"] for r in rows} == {"bf16", "f32"}
    assert all(r["quantized"] == "int8 full" and 0.95 <= r["min_cosine"] < 0.99999 for r in rows), rows
    assert _ops(result.bundle / "transformer" / "openvino_model.xml").get("FakeQuantize", 0) > 10


def test_emulated_bf16_runs_the_quantized_unet_as_native_bf16_does(full_int8) -> None:  # type: ignore[no-untyped-def]
    """Where the CPU lacks bf16 (AVX2-only EPYCs) the gate emulates it: the emulation must handle a graph full of
    FakeQuantize ops and land where this CPU's native bf16 lands (this host has avx512_bf16)."""
    import openvino as ov

    from validate.precision import ExecutionMode, compile_for, plan_execution
    from validate.submodels import cosine

    core = ov.Core()
    model = core.read_model(full_int8.bundle / "unet" / "openvino_model.xml")
    rng = np.random.default_rng(0)
    inputs = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32), "timestep": np.array([500], np.int64),
              "encoder_hidden_states": rng.standard_normal((2, 77, 96), dtype=np.float32),
              "text_embeds": rng.standard_normal((2, 64), dtype=np.float32),
              "time_ids": np.array([[64, 64, 0, 0, 64, 64]] * 2, np.float32)}
    inputs = {k: v for k, v in inputs.items() if k in {p.get_any_name() for p in model.inputs}}
    emulated = next(iter(compile_for(core, model, ExecutionMode("bf16", "CPU", True, "test"), inputs)(inputs).values()))
    f32 = next(iter(compile_for(core, model, ExecutionMode("f32", "CPU", False, "test"), inputs)(inputs).values()))
    assert np.isfinite(emulated).all() and 0.99 < cosine(emulated, f32) < 1.0
    native = plan_execution(core, "CPU", "bf16")
    if not native.emulated:  # this host computes bf16: the emulation agrees with it about as well as with f32
        real = next(iter(compile_for(core, model, native, inputs)(inputs).values()))
        assert cosine(emulated, real) > 0.99


@pytest.mark.parametrize("mode", ["full", "hybrid"])
def test_a_denoiser_quantized_in_pieces_matches_it_quantized_whole(mode: str) -> None:
    """What makes full int8 of the SDXL UNet fit (nncf.quantize needs ~15 bytes per parameter of what it is
    given): the pieces, joined, are one model with the same inputs, outputs and runtime info, compute what the
    unquantized model computes when nothing is quantized, and quantized come out as close to f32 as the whole."""
    import openvino as ov

    from convert.quantize import quantize_model
    from convert.quantize_pieces import f32_weight_bytes
    from convert.recipe import ComponentSettings, QuantizationSettings
    from tests.test_unet_gate import _inputs, _ir

    core = ov.Core()
    model = _ir(overflow=False)
    model.set_rt_info("0.5", ["runtime_options", "ACTIVATIONS_SCALE_FACTOR"])
    model.outputs[0].get_tensor().set_names({"out_sample"})  # as optimum names it
    rng = np.random.default_rng(3)
    calls = [_inputs(step % 3) | {"encoder_hidden_states": rng.standard_normal((2, 77, 96)).astype(np.float32)}
             for step in range(6)]
    held_out = [_inputs(step) for step in range(3)]

    compiled: dict[int, tuple[ov.Model, ov.CompiledModel]] = {}  # the model is kept: its id stays its own

    def run(m: ov.Model, x: dict[str, np.ndarray]) -> np.ndarray:  # one compile per model (~1.6 s each), not per call
        if id(m) not in compiled:
            compiled[id(m)] = m, core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.array(compiled[id(m)][1](x)[0], np.float64).ravel()

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    reference = [run(model, x) for x in held_out]
    if mode == "full":  # the join itself, once
        _joined_is_the_model(model, calls[:2], held_out, reference, run, rng)

    quant, settings = QuantizationSettings(mode=mode), ComponentSettings(weights="int8")
    lines: list[str] = []
    whole = quantize_model(model.clone(), quant, settings, calls)
    pieces = quantize_model(model, quant, settings, calls, lines.append, piece_bytes=f32_weight_bytes(model) // 3 + 1)
    assert lines[0].startswith("quantize: 3 pieces") and lines[-1].startswith("quantize: piece 3/3")
    fake = [sum(op.get_type_name() == "FakeQuantize" for op in m.get_ops()) for m in (whole, pieces)]
    assert fake[0] > 0 and abs(fake[1] - fake[0]) <= 0.1 * fake[0]  # an activation read across a cut: one more each
    for x, r in zip(held_out, reference, strict=True):
        a, b = cosine(run(whole, x), r), cosine(run(pieces, x), r)
        assert a < 0.9999 and b < 0.9999  # quantized, both
        assert abs(a - b) < 0.002, (a, b)


def _joined_is_the_model(model, calls, held_out, reference, run, rng) -> None:  # type: ignore[no-untyped-def]
    """Pieces joined with nothing quantized: the same inputs, outputs, runtime info and values, still dynamic."""
    from convert.quantize_pieces import quantize_in_pieces
    from tests.test_unet_gate import _inputs

    joined = quantize_in_pieces(model, calls, 3, lambda piece, _samples, _ignored: piece)
    assert [p.get_names() for p in joined.inputs] == [p.get_names() for p in model.inputs]
    assert [p.get_names() for p in joined.outputs] == [p.get_names() for p in model.outputs]
    assert len(joined.outputs) == 1
    assert joined.get_rt_info(["runtime_options", "ACTIVATIONS_SCALE_FACTOR"]).astype(str) == "0.5"
    assert all(np.array_equal(run(joined, x), r) for x, r in zip(held_out, reference, strict=True))
    wider = _inputs(1) | {"sample": rng.standard_normal((2, 4, 16, 12)).astype(np.float32)}
    assert np.array_equal(run(joined, wider), run(model, wider))  # still dynamic: no shape of the calibration baked in

