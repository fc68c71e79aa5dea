"""Community-checkpoint fixtures: the original-layout single file and the two LoRA layouts round-trip
through diffusers' own loaders (the product relies on them; the fixtures must be what they claim)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from convert.testing import generate
from convert.testing.sdxl import build_tiny_sdxl_pipeline
from convert.testing.single_file import CHECKPOINT, LORA_DIFFUSERS, LORA_KOHYA

WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single-file")
    return {name: generate(name, root / name) for name in
            ("tiny-sdxl-single-file", "tiny-sdxl-single-file-config", "tiny-sdxl-lora")}


def _load(fixtures: dict[str, Path]):  # noqa: ANN202 - a diffusers pipeline
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(
        str(fixtures["tiny-sdxl-single-file"] / CHECKPOINT), config=str(fixtures["tiny-sdxl-single-file-config"]),
        local_files_only=True)


def test_single_file_round_trips_through_diffusers(fixtures: dict[str, Path]) -> None:
    from safetensors import safe_open

    with safe_open(str(fixtures["tiny-sdxl-single-file"] / CHECKPOINT), "pt") as handle:
        keys = set(handle.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys  # original (sgm) layout, not diffusers
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys  # the VAE is baked in
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith(("unet.", "down_blocks.")) for k in keys)
    loaded, original = _load(fixtures), build_tiny_sdxl_pipeline(0)
    for component in WEIGHTED:
        want, got = getattr(original, component).state_dict(), getattr(loaded, component).state_dict()
        assert set(got) == set(want), component
        unequal = [k for k in want if not torch.equal(want[k], got[k])]
        assert unequal == [], f"{component}: {len(unequal)} tensors differ, e.g. {unequal[:3]}"


def test_config_source_has_no_weights(fixtures: dict[str, Path]) -> None:
    files = [p for p in fixtures["tiny-sdxl-single-file-config"].rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.suffix in (".safetensors", ".bin")]
    assert (fixtures["tiny-sdxl-single-file-config"] / "tokenizer_2" / "tokenizer.json").is_file()


def test_lora_layouts_fuse_to_the_same_weights(fixtures: dict[str, Path]) -> None:
    fused = []
    for weight_name in (LORA_DIFFUSERS, LORA_KOHYA):
        pipe = _load(fixtures)
        before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        pipe.load_lora_weights(str(fixtures["tiny-sdxl-lora"]), weight_name=weight_name, adapter_name="t")
        pipe.fuse_lora(lora_scale=0.8, components=["unet"])
        pipe.unload_lora_weights()
        after = pipe.unet.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert set(after) == set(before)
        assert len(changed) == 136, weight_name  # q, k, v, out of each of the 34 attention layers
        fused.append(after)
    assert all(torch.equal(fused[0][k], fused[1][k]) for k in fused[0])


SDXL_UNET = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
             "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}


@pytest.mark.parametrize(("keys", "expected"), [
    ({**SDXL_UNET, "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
      "conditioner.embedders.1.model.positional_embedding": (77, 1280)}, "stable-diffusion-xl"),
    ({**SDXL_UNET, "conditioner.embedders.0.model.text_projection": (1280, 1280)}, "stable-diffusion-xl-refiner"),
    ({"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)}, "an SD 1.x"),
    ({"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "stable-diffusion-v1"),
    ({"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),  # inpainting
      "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "an SD 1.x"),
    ({"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),  # LCM-distilled
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "model.diffusion_model.time_embed.cond_proj.weight": (1280, 256)}, "an SD 1.x"),
    ({"cond_stage_model.model.token_embedding.weight": (49408, 1024)}, "an SD 2.x"),
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,)}, "an SD3 / SD3.5"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "a FLUX"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 640)}, "a LoRA, not a full"),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "a diffusers-layout UNet file, not a full"),
    (SDXL_UNET, "a UNet-only (no VAE, no text encoders)"),
    ({"something": (1,)}, "an unrecognised"),
])
def test_detect_architecture_from_names_and_shapes(keys: dict[str, tuple[int, ...]], expected: str) -> None:
    from convert.single_file import detect_architecture

    assert detect_architecture(keys) == expected


def test_generated_single_file_is_detected_as_sdxl_base(fixtures: dict[str, Path]) -> None:
    from convert.fetch import read_safetensors_header
    from convert.single_file import detect_architecture, shapes_of

    header = read_safetensors_header(fixtures["tiny-sdxl-single-file"] / CHECKPOINT)
    assert detect_architecture(shapes_of(header)) == "stable-diffusion-xl"


def test_cache_keys_follow_the_single_file_and_every_lora(artifacts_root: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A single-file base and its LoRAs write into every component's weights, so the component cache
    must not reuse a submodel exported from another file, another LoRA or another LoRA scale."""
    import json

    from convert.cli import main
    from convert.workspace import PROJECT_ROOT

    original = (PROJECT_ROOT / "recipes" / "tiny-singlefile-lora.yaml").read_text()

    def keys(text: str, name: str) -> dict[str, str]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(text.replace("name: tiny-singlefile-lora", f"name: {name}"))
        assert main(["cache-key", str(path), "--json", "--artifacts", str(artifacts_root)]) == 0
        return json.loads(capsys.readouterr().out)["components"]

    base = keys(original, "keys-base")
    assert "scale: 0.8" in original and LORA_KOHYA in original
    scaled = keys(original.replace("scale: 0.8", "scale: 0.5"), "keys-scale")
    other_file = keys(original.replace(LORA_KOHYA, LORA_DIFFUSERS), "keys-file")
    assert all(scaled[c] != base[c] for c in ("unet", "text_encoder", "text_encoder_2"))
    assert all(other_file[c] != base[c] for c in ("unet", "text_encoder", "text_encoder_2"))
    assert keys(original, "keys-again") == base  # the recipe's name is not part of a component's key


def _text_encoder_lora(folder: Path) -> Path:
    """A rank-4 LoRA on the tiny text_encoder's attention (peft), B seeded so it is not a no-op."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    encoder = build_tiny_sdxl_pipeline(0).text_encoder
    encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
    StableDiffusionXLPipeline.save_lora_weights(folder, text_encoder_lora_layers=layers, safe_serialization=True)
    return folder / LORA_DIFFUSERS


def test_a_text_encoder_lora_fuses_like_diffusers_and_refuses_the_wrong_target(
        fixtures: dict[str, Path], tmp_path: Path) -> None:
    from convert.errors import PatchError
    from convert.fetch import FetchedSource
    from convert.recipe import Lora
    from convert.roles import SourceRole
    from convert.single_file import fuse_lora

    file = _text_encoder_lora(tmp_path)
    fetched = FetchedSource(role=SourceRole.lora(0), path=tmp_path, commit="local", files=())
    lora = Lora.model_validate({"source": {"local": {"path": str(tmp_path)}, "file": file.name},
                                "scale": 0.7, "targets": ["text_encoder"]})
    pipe = _load(fixtures)
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    fused = fuse_lora(pipe, lora, fetched)
    layers = 4 * pipe.text_encoder.config.num_hidden_layers  # q, k, v, out of each encoder layer
    assert fused.modules == {"text_encoder": layers}
    ours = pipe.text_encoder.state_dict()
    assert len([k for k in before if not torch.equal(before[k], ours[k])]) == layers
    assert all(torch.equal(unet_before[k], v) for k, v in pipe.unet.state_dict().items())

    reference = _load(fixtures)  # diffusers' own load + fuse, same scale
    reference.load_lora_weights(str(tmp_path), weight_name=file.name, adapter_name="t")
    reference.fuse_lora(lora_scale=0.7, components=["text_encoder"])
    reference.unload_lora_weights()
    theirs = reference.text_encoder.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)

    wrong = Lora.model_validate({"source": {"local": {"path": str(tmp_path)}, "file": file.name}, "targets": ["unet"]})
    with pytest.raises(PatchError, match=rf"also holds {layers} text_encoder LoRA layers, outside its targets"):
        fuse_lora(_load(fixtures), wrong, fetched)


@pytest.mark.parametrize(("suffix", "said"), [
    ("dora_scale", "is a DoRA LoRA: {n} of its {total} tensors are DoRA magnitudes (.dora_scale) that diffusers' loader "
                   "drops while it fuses the rest; DoRA is not supported"),
    ("hada_w1_a", "holds LyCORIS LoHa layers ({n} tensors), which diffusers' LoRA loader cannot fuse"),
])
def test_dora_and_lycoris_loras_are_refused_with_the_count(suffix: str, said: str, fixtures: dict[str, Path],
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """diffusers fuses a DoRA file's low-rank part and drops the magnitudes with a warning: never silently (issue 19)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from convert.cli import main
    from tests.test_faults import nothing_changes_outside, one_error_line

    tensors = load_file(str(fixtures["tiny-sdxl-lora"] / LORA_KOHYA))
    modules = sorted({k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_down.weight")})
    extra = {f"{m}.{suffix}": torch.ones(1, 4) for m in modules}
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    save_file(tensors | extra, str(lora_dir / "odd-lora.safetensors"))
    base = tmp_path / "base"
    shutil.copytree(fixtures["tiny-sdxl-single-file"], base)
    recipe = tmp_path / "odd-lora.yaml"
    recipe.write_text(
        "schema_version: 1\nname: odd-lora\n"
        f"base:\n  local: {{path: {base}}}\n  file: {CHECKPOINT}\n  config:\n    local: {{path: {fixtures['tiny-sdxl-single-file-config']}}}\n"
        f"lora:\n  - source: {{local: {{path: {lora_dir}}}, file: odd-lora.safetensors}}\n    targets: [unet]\n")
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        assert main(["--artifacts", str(tmp_path / "art"), "convert", str(recipe)]) == 4
    line = one_error_line(capsys)
    assert line.startswith("error: lora.0: odd-lora.safetensors " + said.format(n=len(extra), total=len(tensors) + len(extra)))
    assert line.endswith("use a plain LoRA of this file (kohya or peft, without DoRA or LyCORIS), e.g. re-exported by its trainer")
    assert not (tmp_path / "art" / "odd-lora").exists()


def test_full_size_lora_maps_onto_every_attention_projection_of_the_full_unet(tmp_path: Path) -> None:
    """The full-size benchmark's LoRA: diffusers' own kohya loader places all 560 layers on the full UNet."""
    import warnings

    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    from convert.testing import generate
    from convert.testing.single_file import FULL_LORA, FULL_LORA_RANK, _full_unet_topology

    folder = generate("sdxl-shapes-lora", tmp_path / "lora")
    unet = _full_unet_topology()  # meta parameters: names and shapes, no 5 GB of weights
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(folder / FULL_LORA), unet_config=unet.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying ... to a meta parameter is a no-op": the base weights are meta
        StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="t")
    placed = [m for m in unet.modules() if isinstance(m, BaseTunerLayer) and "t" in getattr(m, "lora_A", {})]
    assert len(placed) == 4 * 140  # q, k, v, out of SDXL's 70 transformer blocks x 2 attentions
    assert {m.lora_A["t"].weight.shape[0] for m in placed} == {FULL_LORA_RANK}
