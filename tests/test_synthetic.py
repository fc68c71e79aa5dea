"""Tests for convert.testing (the generators): the overflow-prone VAE pair and the tiny SDXL pipeline.

The VAE tests use real torch half on CPU (slow per op, so latents are at most 8x8) as the ground
truth for "this overflows FP16", independent of any OpenVINO emulation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors import safe_open
from skimage import data
from skimage.transform import resize
from torch import nn

from convert.testing import GENERATORS, generate, generator_version
from convert.testing.sdxl import (
    build_full_sdxl_pipeline,
    build_overflow_vae,
    build_tiny_sdxl_pipeline,
    build_tokenizers,
    fix_vae_for_fp16,
    write_pipeline,
    write_vae,
)

FP16_MAX = 65504.0
LATENT_SIZE = 8  # 64x64 photo: torch half convolutions on CPU are very slow
RANDOM_LATENT_SIZE = 4
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


# --------------------------------------------------------------------------- helpers


def _psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB with the reference's range as peak; NaN anywhere gives -inf."""
    x, reference = x.double(), reference.double()
    if not torch.isfinite(x).all():
        return -math.inf
    mse = torch.mean((x - reference) ** 2).item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _nonfinite(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x)).sum())


@contextmanager
def _recorded_peaks(model: nn.Module, prefixes: tuple[str, ...]) -> Iterator[dict[str, float]]:
    """Max |output| of every submodule under ``prefixes``, via forward hooks removed on exit."""
    peaks: dict[str, float] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                peaks[name] = max(peaks.get(name, 0.0), output.detach().abs().float().max().item())

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n.startswith(prefixes)]
    try:
        yield peaks
    finally:
        for handle in handles:
            handle.remove()


def _decode(vae: AutoencoderKL, pipeline_latents: torch.Tensor) -> torch.Tensor:
    """Decode as a pipeline does: latents divided by the scaling factor, in the VAE's dtype."""
    dtype = vae.dtype
    with torch.no_grad():
        return vae.decode(pipeline_latents.to(dtype) / vae.config.scaling_factor).sample.float()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES))


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in _weight_files(folder)}


# --------------------------------------------------------------------------- VAE fixtures


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return build_overflow_vae("tiny", seed=0)


@pytest.fixture(scope="module")
def fixed_vae(vae: AutoencoderKL) -> AutoencoderKL:
    return fix_vae_for_fp16(vae)


@pytest.fixture(scope="module")
def half_vaes(vae: AutoencoderKL, fixed_vae: AutoencoderKL) -> dict[str, AutoencoderKL]:
    return {"original": copy.deepcopy(vae).half(), "fixed": copy.deepcopy(fixed_vae).half()}


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A real photo (astronaut), 64x64, NCHW in [-1, 1] as VaeImageProcessor gives it."""
    pixels = resize(data.astronaut(), (8 * LATENT_SIZE, 8 * LATENT_SIZE), anti_aliasing=True)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() * 2 - 1


@pytest.fixture(scope="module")
def latents(vae: AutoencoderKL, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pipeline-scale latents (x scaling_factor): the encoded photo, and N(0, 1) noise."""
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
    encoded = posterior.sample(generator=torch.Generator().manual_seed(0)) * vae.config.scaling_factor
    noise = torch.randn((1, 4, RANDOM_LATENT_SIZE, RANDOM_LATENT_SIZE), generator=torch.Generator().manual_seed(0))
    return {"image": encoded, "random": noise}


@pytest.fixture(scope="module")
def reference(vae: AutoencoderKL, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """f32 decodes by the original VAE: what every other decode is compared with."""
    return {kind: _decode(vae, z) for kind, z in latents.items()}


# --------------------------------------------------------------------------- overflow-prone VAE


def test_encoded_photo_has_sdxl_like_latents(latents: dict[str, torch.Tensor]) -> None:
    encoded = latents["image"]
    assert encoded.shape == (1, 4, LATENT_SIZE, LATENT_SIZE)
    assert 0.3 < encoded.std().item() < 3.0  # scaling_factor makes SDXL latents ~unit variance


@pytest.mark.parametrize("kind", ["image", "random"])
def test_original_f32_decode_is_finite_and_sane(reference: dict[str, torch.Tensor], kind: str) -> None:
    y = reference[kind]
    assert y.shape[:2] == (1, 3) and y.shape[2] == 8 * (LATENT_SIZE if kind == "image" else RANDOM_LATENT_SIZE)
    assert _nonfinite(y) == 0
    assert y.abs().max().item() < 2.5
    assert y.std().item() > 0.05  # not a flat image


def test_original_decoder_activations_exceed_fp16(vae, latents) -> None:
    with _recorded_peaks(vae, ("decoder.up_blocks", "decoder.mid_block")) as peaks:
        _decode(vae, latents["image"])
    up = max(v for k, v in peaks.items() if k.startswith("decoder.up_blocks"))
    assert up > FP16_MAX
    assert max(v for k, v in peaks.items() if k.startswith("decoder.mid_block")) < up  # grows along the stream


def test_original_encoder_activations_exceed_fp16(vae, image) -> None:
    with _recorded_peaks(vae, ("encoder.down_blocks", "encoder.mid_block")) as peaks, torch.no_grad():
        vae.encode(image)
    assert max(peaks.values()) > FP16_MAX


@pytest.mark.parametrize("kind", ["image", "random"])
def test_original_half_decode_is_all_nonfinite(half_vaes, latents, kind: str) -> None:
    y = _decode(half_vaes["original"], latents[kind])
    assert _nonfinite(y) >= 0.99 * y.numel()


def test_original_half_encode_is_nonfinite(half_vaes, image) -> None:
    with torch.no_grad():
        z = half_vaes["original"].encode(image.half()).latent_dist.mode()
    assert _nonfinite(z) >= 0.99 * z.numel()


# --------------------------------------------------------------------------- training-free fix


def test_fix_returns_a_new_vae_with_upcast_off(vae: AutoencoderKL, fixed_vae: AutoencoderKL) -> None:
    assert fixed_vae is not vae
    assert vae.config.force_upcast is True
    assert fixed_vae.config.force_upcast is False
    rebuilt = build_overflow_vae("tiny", seed=0)  # the fix left its input untouched
    for (name, a), b in zip(vae.state_dict().items(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["image", "random"])
def test_fixed_f32_decode_matches_original(fixed_vae, latents, reference, kind: str) -> None:
    assert _psnr(_decode(fixed_vae, latents[kind]), reference[kind]) >= 90


def test_fixed_f32_encode_matches_original(vae, fixed_vae, image) -> None:
    with torch.no_grad():
        z = vae.encode(image).latent_dist.mode()
        z_fixed = fixed_vae.encode(image).latent_dist.mode()
    assert _psnr(z_fixed, z) >= 90


def test_fixed_activations_stay_in_fp16_range(fixed_vae, image, latents) -> None:
    with _recorded_peaks(fixed_vae, ("encoder", "decoder")) as peaks:
        with torch.no_grad():
            fixed_vae.encode(image)
        _decode(fixed_vae, latents["image"])
    assert 0 < max(peaks.values()) < FP16_MAX


@pytest.mark.parametrize("kind", ["image", "random"])
def test_fixed_half_decode_is_finite_and_close(half_vaes, latents, reference, kind: str) -> None:
    y = _decode(half_vaes["fixed"], latents[kind])
    assert _nonfinite(y) == 0
    assert _psnr(y, reference[kind]) >= 40


def test_fixed_half_encode_is_finite_and_close(vae, half_vaes, image) -> None:
    with torch.no_grad():
        z = vae.encode(image).latent_dist.mode()
        z_half = half_vaes["fixed"].encode(image.half()).latent_dist.mode().float()
    assert _nonfinite(z_half) == 0
    assert _psnr(z_half, z) >= 40


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_fix_rejects_bad_scale(vae: AutoencoderKL, scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        fix_vae_for_fp16(vae, scale=scale)


def test_unknown_vae_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="tiny"):
        build_overflow_vae("medium")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- tokenizers


def test_tokenizers_look_like_sdxl(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tokenizer, tokenizer_2 = build_tokenizers(scratch)
    assert list(scratch.iterdir()) == []  # built in memory
    assert 500 <= len(tokenizer) <= 600 and len(tokenizer) == len(tokenizer_2)
    assert tokenizer.model_max_length == tokenizer_2.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer_2.pad_token == "!"
    ids = tokenizer_2("A photo of the cat, singing!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer_2.bos_token_id and ids[-1] == tokenizer_2.pad_token_id
    assert tokenizer.decode(tokenizer("the cat").input_ids, skip_special_tokens=True) == "the cat"
    assert tokenizer.tokenize("the") == ["the</w>"]  # merges are used


# --------------------------------------------------------------------------- tiny pipeline


@pytest.fixture(scope="module")
def tiny_pipe() -> StableDiffusionXLPipeline:
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate("tiny-sdxl-base", tmp_path_factory.mktemp("gen") / "tiny-sdxl-base", seed=0)


def test_tiny_pipeline_is_sdxl_shaped(tiny_pipe: StableDiffusionXLPipeline) -> None:
    unet, te1, te2 = tiny_pipe.unet.config, tiny_pipe.text_encoder.config, tiny_pipe.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert te1.hidden_size != te2.hidden_size  # a swapped encoder would not go unnoticed
    assert len(unet.block_out_channels) == 3 and unet.use_linear_projection
    assert tiny_pipe.config.force_zeros_for_empty_prompt is True
    assert isinstance(tiny_pipe.scheduler, EulerDiscreteScheduler)
    assert tiny_pipe.scheduler.config.timestep_spacing == "leading"
    assert tiny_pipe.vae.config.force_upcast is True
    assert sum(p.numel() for p in tiny_pipe.unet.parameters()) < 20_000_000


def test_tiny_generation_is_finite(tiny_pipe: StableDiffusionXLPipeline) -> None:
    out = tiny_pipe(
        prompt="a photo of an astronaut",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_written_pipeline_is_safetensors_only_and_reloads(tiny_dir: Path, tiny_pipe) -> None:
    weights = _weight_files(tiny_dir)
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert not list(tiny_dir.parent.glob(".*partial*"))  # no leftover temporary folder
    loaded = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        original, reloaded = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(original[k], reloaded[k]) for k in original), name
    assert loaded.tokenizer_2.pad_token == "!"
    assert loaded.config.force_zeros_for_empty_prompt is True


def test_generation_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = generate("tiny-sdxl-base", tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_dir)
    assert len(_digests(again)) == 4  # unet, vae, both text encoders


def test_seed_changes_the_weights(vae: AutoencoderKL) -> None:
    other = build_overflow_vae("tiny", seed=1)
    assert not torch.equal(other.decoder.conv_in.weight, vae.decoder.conv_in.weight)


def test_fp16_variant_is_really_fp16(tiny_pipe, tmp_path: Path) -> None:
    out = write_pipeline(tiny_pipe, tmp_path / "fp16", variant="fp16")
    weights = _weight_files(out)
    assert weights and all(p.name.endswith(".fp16.safetensors") for p in weights)
    for path in weights:
        with safe_open(path, framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
    assert tiny_pipe.unet.dtype == torch.float32  # the caller's pipeline is not cast


def test_vae_fix_generator_matches_the_pipeline_vae(tiny_dir: Path, tmp_path: Path) -> None:
    fixed_dir = generate("tiny-sdxl-vae-fp16-fix", tmp_path / "vae-fix", seed=0)
    assert sorted(p.name for p in fixed_dir.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((fixed_dir / "config.json").read_text())["force_upcast"] is False
    expected = fix_vae_for_fp16(AutoencoderKL.from_pretrained(tiny_dir / "vae")).state_dict()
    written = AutoencoderKL.from_pretrained(fixed_dir).state_dict()
    assert all(torch.equal(expected[k], written[k]) for k in expected)


def test_write_vae_into_an_empty_folder(fixed_vae: AutoencoderKL, tmp_path: Path) -> None:
    target = tmp_path / "out" / "vae"
    target.mkdir(parents=True)
    assert write_vae(fixed_vae, target) == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["vae"]  # temporary sibling renamed away
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_write_refuses_a_non_empty_folder(fixed_vae: AutoencoderKL, tmp_path: Path) -> None:
    target = tmp_path / "out" / "vae"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_vae(fixed_vae, target)
    assert [p.name for p in target.parent.iterdir()] == ["vae"]
    assert (target / "keep.txt").read_text() == "user data"


def test_unknown_generator_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny-sdxl-base") as error:
        generate("tiny-sdxl-bsae", tmp_path / "x")
    assert all(name in str(error.value) for name in GENERATORS)
    assert not (tmp_path / "x").exists()


def test_registry_lists_the_documented_generators() -> None:
    assert set(GENERATORS) == {
        "tiny-sdxl-base",
        "tiny-sdxl-vae-fp16-fix",
        "tiny-sdxl-vae-offstream-overflow",
        "sdxl-base-shapes",
        "sdxl-vae-shapes",
        "sdxl-vae-shapes-fp16-fix",
        "tiny-sd35-medium",
        "tiny-sdxl-refiner",
        "tiny-sdxl-unet",
        "tiny-sdxl-unet-fp16-overflow",
        "tiny-sdxl-single-file",
        "tiny-sdxl-single-file-config",
        "tiny-sdxl-lora",
        "sdxl-base-shapes-single-file",
        "sdxl-shapes-lora",
        "tiny-sd15",
        "tiny-sd15-lcm",
        "tiny-sd15-single-file",
        "tiny-sd15-config",
        "tiny-sd35-transformer-fp16-overflow",
        "tiny-sdxl-unet-activation-outliers",
    }


def test_generator_version_is_the_hash_of_its_source() -> None:
    import hashlib

    import convert.testing.sd3 as sd3_module
    import convert.testing.sdxl as sdxl_module
    from convert.recipe import GeneratedSource, Source
    from convert.resolve import generated_dir
    from convert.workspace import Workspace

    sdxl_source = Path(sdxl_module.__file__).read_bytes()
    assert generator_version("tiny-sdxl-base") == hashlib.sha256(sdxl_source).hexdigest()[:12]
    both = hashlib.sha256(Path(sd3_module.__file__).read_bytes() + sdxl_source).hexdigest()[:12]
    assert generator_version("tiny-sd35-medium") == both  # SD3's generator builds on the SDXL one
    folder = generated_dir(Source(generated=GeneratedSource(generator="tiny-sdxl-base", seed=3)), Workspace(Path("/a")))
    assert folder == Path("/a/sources") / f"tiny-sdxl-base-seed3-{generator_version('tiny-sdxl-base')}"


# --------------------------------------------------------------------------- full size (opt-in)


@pytest.mark.slow
def test_full_pipeline_has_sdxl_base_parameter_counts() -> None:
    """Builds ~7 GiB of fp16 weights (about 1.5 min here): opt-in only (tests/conftest.py)."""
    pipe = build_full_sdxl_pipeline(seed=0)
    counts = {n: sum(p.numel() for p in c.parameters()) for n, c in pipe.components.items() if isinstance(c, nn.Module)}
    assert counts == {
        "unet": 2_567_463_684,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
        "vae": 83_653_863,
    }
    assert {c.dtype for n, c in pipe.components.items() if isinstance(c, nn.Module)} == {torch.float16}


def test_unet_twin_generator_is_the_pipeline_unet(tiny_sources: dict[str, Path], tmp_path: Path) -> None:
    """The overflow UNet's unscaled twin is bitwise the tiny pipeline's UNet, which passes the gate."""
    from safetensors.numpy import load_file

    from convert.testing.sdxl import UNET_OVERFLOW_BLOCK

    twin = load_file(generate("tiny-sdxl-unet", tmp_path / "twin") / "diffusion_pytorch_model.safetensors")
    overflow = load_file(generate("tiny-sdxl-unet-fp16-overflow", tmp_path / "overflow") / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_sources["tiny-sdxl-base"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert twin.keys() == base.keys() == overflow.keys()
    assert all(np.array_equal(twin[k], base[k]) for k in base)
    changed = sorted(k for k in base if not np.array_equal(overflow[k], base[k]))
    assert changed == sorted(f"{UNET_OVERFLOW_BLOCK}.{layer}.{p}" for layer in ("conv1", "time_emb_proj") for p in ("weight", "bias"))
