"""Seeded, offline SDXL-shaped pipelines and an FP16-overflow-prone VAE pair.

No real SDXL weights are reachable from CI, yet the converter must be tested on the
real architecture and on the real failure (the SDXL VAE overflowing FP16). This module
builds both from seeded random weights:

* every parameter is drawn from its own generator, seeded from (seed, component,
  parameter name), so a file is bitwise reproducible and independent of build order;
* the VAE's residual-stream writers are scaled by growing gains so that f32 output is
  sane while internal activations exceed the FP16 range, as in the real SDXL VAE
  (see ``/work/shared/notes/fp16-numerics.md``);
* :func:`fix_vae_for_fp16` derives the FP16-safe twin without training (the operation is
  :mod:`convert.rescale`), and :func:`build_offstream_overflow_vae` adds overflow off the
  stream (a resnet's conv1), which a stream-only fix misses;
* :func:`build_tiny_unet` with ``overflow=True`` is the tiny UNet with one resnet's inner
  activation scaled past the FP16 range, f32 output unchanged (the UNet gate's fixture).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from convert.rescale import scale_layer_

if TYPE_CHECKING:  # diffusers/transformers cost seconds to import: only load them when building
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

__all__ = [
    "Size", "UNET_OVERFLOW_BLOCK", "build_full_sdxl_pipeline", "build_offstream_overflow_vae", "build_overflow_vae",
    "build_tiny_sdxl_pipeline", "build_tiny_unet", "build_tokenizers", "fix_vae_for_fp16", "sdxl_base_shapes",
    "sdxl_vae_shapes", "sdxl_vae_shapes_fp16_fix", "tiny_sdxl_base", "tiny_sdxl_unet", "tiny_sdxl_unet_activation_outliers",
    "tiny_sdxl_unet_fp16_overflow",
    "tiny_sdxl_vae_fp16_fix", "tiny_sdxl_vae_offstream_overflow", "write_pipeline", "write_unet", "write_vae",
]  # fmt: skip

logger = logging.getLogger(__name__)

Size = Literal["tiny", "full"]

_CHUNK = 1 << 22  # values drawn per step when seeding a parameter (16 MiB of f32 scratch)

# --------------------------------------------------------------------------- tokenizers

# A few merges so BPE is exercised beyond single bytes; the tokens they create are in the vocab.
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"),
    ("i", "n"), ("in", "g</w>"), ("o", "n"), ("e", "r"),
)  # fmt: skip
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_MAX_LENGTH = 77


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table, in CLIP's vocab order ("!" first, as id 0)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = 256 - len(printable)  # mapped past U+0100, in byte order
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(unprintable)]


def _clip_vocab() -> dict[str, int]:
    """CLIP's vocab layout in miniature: bytes, bytes ending a word, merges, then specials."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in _MERGES] + [_BOS, _EOS]
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizers(out_dir: Path | None = None) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """The two SDXL tokenizers over a ~520-token byte-level vocab.

    Built in memory (transformers 5 takes the vocab and merges directly), so ``out_dir``
    is never written to; it is accepted for callers of the original signature.
    tokenizer_2 pads with "!" like SDXL's OpenCLIP tokenizer.
    """
    from transformers import CLIPTokenizer

    del out_dir  # nothing to write

    def tokenizer(**kwargs: str) -> CLIPTokenizer:
        return CLIPTokenizer(vocab=_clip_vocab(), merges=list(_MERGES), model_max_length=_MAX_LENGTH, **kwargs)

    return tokenizer(), tokenizer(pad_token="!")


# --------------------------------------------------------------------------- seeded weights


def _generator(key: str) -> torch.Generator:
    """A generator seeded from a stable hash (Python's hash() is salted per process)."""
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _init_rule(module: nn.Module, name: str, shape: torch.Size) -> tuple[float, float]:
    """(offset, half-width) of the uniform law for one parameter.

    U(+-1/sqrt(fan_in)) for conv/linear weights and biases, ~1 / ~0 for norm affines,
    std 0.02 for embeddings (as CLIP initialises them).
    """
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return (1.0, 0.1) if name == "weight" else (0.0, 0.1)
    if isinstance(module, nn.Embedding):
        return 0.0, 0.02 * math.sqrt(3)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        fan_in = math.prod(weight.shape[1:])
    else:
        fan_in = shape[-1] if len(shape) else 1
    return 0.0, 1 / math.sqrt(fan_in)


def _seeded_tensor(
    shape: torch.Size, offset: float, width: float, key: str, dtype: torch.dtype, scratch: torch.Tensor
) -> torch.Tensor:
    """offset + U(-width, width), drawn in f32 and rounded once to ``dtype``.

    Drawn in chunks through one shared f32 ``scratch``: per-tensor f32 temporaries left
    ~50% of the weights' size stranded in the allocator (measured on the bigG encoder).
    """
    out = torch.empty(shape, dtype=dtype)
    flat, generator = out.view(-1), _generator(key)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        draw = torch.rand(chunk.numel(), generator=generator, out=scratch[: chunk.numel()])
        chunk.copy_(draw.mul_(2 * width).add_(offset - width))
    return out


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters without storage (buffers stay real), so nothing is initialised twice."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def _materialize(model: nn.Module, component: str, seed: int, dtype: torch.dtype) -> None:
    """Replace every (meta) parameter with seeded values, created directly in ``dtype``."""
    scratch = torch.empty(_CHUNK)
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            path = f"{module_name}.{name}" if module_name else name
            offset, width = _init_rule(module, name, param.shape)
            values = _seeded_tensor(param.shape, offset, width, f"{seed}/{component}/{path}", dtype, scratch)
            module._parameters[name] = nn.Parameter(values, requires_grad=False)
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"{component}: parameters left uninitialised: {leftover[:5]}")


def _cast(model: nn.Module, dtype: torch.dtype) -> Any:
    """Cast floating parameters and buffers in place.

    Calls nn.Module.to directly: diffusers' override logs a spurious "should be kept in
    float32: []" warning on every dtype cast (diffusers 0.39).
    """
    if any(p.dtype != dtype for p in model.parameters()):
        nn.Module.to(model, dtype)
    return model


def _seeded(factory: Callable[[], nn.Module], component: str, seed: int, dtype: torch.dtype) -> Any:
    """Build a model from ``factory`` with seeded weights in ``dtype``, in eval mode."""
    with _parameters_on_meta():
        model = factory()
    _materialize(model, component, seed, dtype)
    return model.eval()


# --------------------------------------------------------------------------- overflow-prone VAE

_VAE_SHAPES: Mapping[Size, Mapping[str, Any]] = MappingProxyType({
    "tiny": {"block_out_channels": [32, 64, 128, 128], "norm_num_groups": 8, "sample_size": 64},
    "full": {"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "sample_size": 1024},
})  # fmt: skip

# Gains of the residual-stream writers, (first, last) per stage in forward order, geometric in
# between. They grow along the stream as in the real SDXL VAE, so mid/up (decoder) and late
# down (encoder) activations exceed 65504 while every GroupNorm still sees a large stream
# (var >> eps / s**2 after the fix, which keeps the rescale exact).
_DECODER_GAINS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "conv_in": (8, 8), "mid_block": (64, 256), "up_blocks.0": (1024, 1024),
    "up_blocks.1": (4096, 8192), "up_blocks.2": (8192, 32768), "up_blocks.3": (8192, 32768),
})  # fmt: skip
_ENCODER_GAINS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "conv_in": (256, 256), "down_blocks.0": (512, 1024), "down_blocks.1": (2048, 4096),
    "down_blocks.2": (8192, 16384), "down_blocks.3": (16384, 32768), "mid_block": (32768, 32768),
})  # fmt: skip
_DECODER_OUT_GAIN = 0.4  # keeps the decoded image in about [-1, 1]
_LATENT_MEAN_GAIN = 40.0  # encoded latents get std ~ 1/scaling_factor, like SDXL's
_LATENT_LOGVAR_OFFSET = -10.0  # near-deterministic posterior: sample() ~ mode()


def _vae_config(size: Size) -> dict[str, Any]:
    """SDXL base vae/config.json (force_upcast: true), with channels and sample size by ``size``."""
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.13025, "force_upcast": True, **_VAE_SHAPES[size],
    }  # fmt: skip


def _stage_writers(block: nn.Module) -> list[nn.Module]:
    """Layers writing into the residual stream of one block, in forward order."""
    resnets = list(block.resnets)
    attentions = [a for a in getattr(block, "attentions", None) or [] if a is not None]
    if not attentions:
        return [r.conv2 for r in resnets]
    order: list[nn.Module] = [resnets[0].conv2]
    for attention, resnet in zip(attentions, resnets[1:], strict=True):
        order += [attention.to_out[0], resnet.conv2]
    return order


def _stages(coder: nn.Module) -> dict[str, list[nn.Module]]:
    """Stream writers of an Encoder/Decoder, grouped by stage name (conv_in, blocks, mid)."""
    stages: dict[str, list[nn.Module]] = {"conv_in": [coder.conv_in]}
    for prefix in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(coder, prefix, None) or []):
            stages[f"{prefix}.{i}"] = _stage_writers(block)
    stages["mid_block"] = _stage_writers(coder.mid_block)
    return stages


def _apply_gains(coder: nn.Module, gains: Mapping[str, tuple[float, float]]) -> None:
    """Multiply each stage's writers by geometrically growing gains."""
    for stage, writers in _stages(coder).items():
        first, last = gains[stage]
        for i, writer in enumerate(writers):
            t = i / (len(writers) - 1) if len(writers) > 1 else 0.0
            scale_layer_(writer, first * (last / first) ** t)


@torch.no_grad()
def _shape_latents(vae: AutoencoderKL) -> None:
    """Give encoded latents SDXL-like statistics through quant_conv (mean rows, logvar rows)."""
    quant = vae.quant_conv
    n = vae.config.latent_channels
    quant.weight[:n].mul_(_LATENT_MEAN_GAIN)
    quant.bias[:n].mul_(_LATENT_MEAN_GAIN)
    quant.weight[n:].mul_(0.1)
    quant.bias[n:].add_(_LATENT_LOGVAR_OFFSET)


def build_overflow_vae(size: Size, seed: int = 0) -> AutoencoderKL:
    """SDXL AutoencoderKL with seeded weights whose f32 output is sane but which overflows FP16.

    Both the decoder (mid/up blocks) and the encoder (late down blocks, mid) carry
    activations above 65504, so torch half decodes/encodes to all-NaN; ``force_upcast`` is
    True, as in the original SDXL VAE.
    """
    from diffusers import AutoencoderKL

    if size not in _VAE_SHAPES:
        raise ValueError(f"unknown VAE size {size!r}; expected one of {sorted(_VAE_SHAPES)}")
    vae = _seeded(lambda: AutoencoderKL(**_vae_config(size)), "vae", seed, torch.float32)
    _apply_gains(vae.decoder, _DECODER_GAINS)
    _apply_gains(vae.encoder, _ENCODER_GAINS)
    scale_layer_(vae.decoder.conv_out, _DECODER_OUT_GAIN)
    _shape_latents(vae)
    return vae


# Off-stream spikes: gains on a resnet's conv1, whose output feeds only its norm2. f32 output
# is unchanged (norm2 sees var >> eps), but f16 overflows there even with the stream rescaled.
_CONV1_SPIKES: Mapping[str, float] = MappingProxyType({
    "decoder.up_blocks.1.resnets.1": 2.0**18, "encoder.down_blocks.1.resnets.0": 2.0**18,
})  # fmt: skip


def build_offstream_overflow_vae(size: Size, seed: int = 0) -> AutoencoderKL:
    """The overflow-prone VAE plus a conv1 spike in one decoder and one encoder resnet.

    A stream-only fix (:func:`fix_vae_for_fp16`) leaves these spikes above 65504; the full
    measured rescale (:func:`convert.rescale.rescale_vae`) scales each conv1 on its own.
    """
    vae = build_overflow_vae(size, seed)
    for path, gain in _CONV1_SPIKES.items():
        scale_layer_(vae.get_submodule(path).conv1, gain)
    return vae


def fix_vae_for_fp16(vae: AutoencoderKL, scale: float = 2.0**-7) -> AutoencoderKL:
    """A stream-rescaled copy of ``vae`` that runs in FP16 with the same output (training-free fix).

    The classic fix, as madebyollin/sdxl-vae-fp16-fix ships it: one fixed power-of-two
    ``scale`` for the residual stream of encoder and decoder, weights only (GroupNorm eps
    is not in a diffusers weights file), ``force_upcast`` False. The operation itself lives
    in :mod:`convert.rescale`; this fixed-scale form builds the substitute fixtures. Exact
    enough only where the stream is much larger than GroupNorm's eps / scale**2, true of the
    overflow-prone VAEs built here (f32 output >110 dB from the original).
    """
    from convert.rescale import apply_rescale, stream_only_plan

    return apply_rescale(vae, [stream_only_plan("encoder", scale), stream_only_plan("decoder", scale)])


# --------------------------------------------------------------------------- pipelines


def _sdxl_unet_config(**overrides: Any) -> dict[str, Any]:
    """stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (non-default keys)."""
    return {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, **overrides,
    }  # fmt: skip


_SDXL_SCHEDULER: Mapping[str, Any] = MappingProxyType({  # scheduler/scheduler_config.json of SDXL base
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
    "timestep_spacing": "leading", "steps_offset": 1,
})  # fmt: skip


@dataclass(frozen=True)
class _TextEncoderShape:
    """CLIP text encoder size; ``vocab_size`` None means the tokenizer's own size."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    projection_dim: int
    hidden_act: str
    vocab_size: int | None = None


@dataclass(frozen=True)
class _PipelineShape:
    """Everything that differs between the tiny and the full-size SDXL pipeline."""

    text_encoder: _TextEncoderShape
    text_encoder_2: _TextEncoderShape
    unet: Mapping[str, Any] = field(default_factory=dict)
    vae: Size = "tiny"
    addition_time_embed_dim: int = 256


_PIPELINE_SHAPES: Mapping[Size, _PipelineShape] = MappingProxyType(
    {
        "tiny": _PipelineShape(
            text_encoder=_TextEncoderShape(32, 64, 3, 4, 32, "quick_gelu"),
            text_encoder_2=_TextEncoderShape(64, 128, 3, 4, 64, "gelu"),
            unet={  # 64x64 images by default; 16-dim attention heads like the real 64 scaled down
                "sample_size": 8, "block_out_channels": [32, 64, 128], "transformer_layers_per_block": [1, 1, 2],
                "attention_head_dim": [2, 4, 8], "norm_num_groups": 8,
            },  # fmt: skip
            vae="tiny",
            addition_time_embed_dim=8,
        ),
        "full": _PipelineShape(  # CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers
            text_encoder=_TextEncoderShape(768, 3072, 12, 12, 768, "quick_gelu", vocab_size=49408),
            text_encoder_2=_TextEncoderShape(1280, 5120, 32, 20, 1280, "gelu", vocab_size=49408),
            vae="full",
        ),
    }
)


def _text_encoder(
    shape: _TextEncoderShape, tokenizer: CLIPTokenizer, projection: bool, seed: int, dtype: torch.dtype
) -> nn.Module:
    """A CLIP text tower with seeded weights; special token ids are the tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        **{**asdict(shape), "vocab_size": shape.vocab_size or len(tokenizer)},
        max_position_embeddings=_MAX_LENGTH,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    name = "text_encoder_2" if projection else "text_encoder"
    return _seeded(lambda: cls(config), name, seed, dtype)


def _pipeline_unet_config(shape: _PipelineShape) -> dict[str, Any]:
    """UNet config whose cross-attention and added-cond sizes fit the pipeline's text encoders."""
    return _sdxl_unet_config(
        cross_attention_dim=shape.text_encoder.hidden_size + shape.text_encoder_2.hidden_size,
        addition_time_embed_dim=shape.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * shape.addition_time_embed_dim + shape.text_encoder_2.projection_dim,
        **shape.unet,
    )


def _build_pipeline(shape: _PipelineShape, seed: int, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """Assemble an SDXL pipeline whose cross-attention and added-cond sizes fit its encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = build_tokenizers()
    text_encoder = _text_encoder(shape.text_encoder, tokenizer, False, seed, dtype)
    text_encoder_2 = _text_encoder(shape.text_encoder_2, tokenizer_2, True, seed, dtype)
    unet_config = _pipeline_unet_config(shape)
    unet = _seeded(lambda: UNet2DConditionModel(**unet_config), "unet", seed, dtype)
    vae = _cast(build_overflow_vae(shape.vae, seed), dtype)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**_SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,  # as SDXL base: an empty negative prompt is zeros
        add_watermarker=False,  # invisible-watermark is not installed, and no real images are made
    )  # fmt: skip


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A few-MB SDXL pipeline (f32, 64x64 default) with the tiny overflow-prone VAE."""
    return _build_pipeline(_PIPELINE_SHAPES["tiny"], seed, torch.float32)


def build_full_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float16) -> StableDiffusionXLPipeline:
    """SDXL-base shapes (2.6 B-parameter UNet) with seeded weights, built directly in ``dtype``.

    Benchmarks only: about 7 GiB in fp16. Parameters are created without storage and filled
    one at a time, so no f32 copy of the model ever exists.
    """
    return _build_pipeline(_PIPELINE_SHAPES["full"], seed, dtype)


# --------------------------------------------------------------------------- overflow-prone UNet

#: The resnet whose inner activation is scaled up, and by how much. Its conv1 output (plus the
#: time projection added to it) only feeds norm2, a GroupNorm: scaling both by s changes the
#: f32 output by GroupNorm's eps only, while at f16 the scaled values (~4 * 2**16) overflow and
#: norm2 turns the whole output NaN, like a distilled or quantized fine-tune gone wrong.
UNET_OVERFLOW_BLOCK = "up_blocks.1.resnets.1"
_UNET_OVERFLOW_GAIN = 2.0**16


#: Attention value channels scaled up (one per head) in `build_tiny_unet(outliers=True)`, and by how much.
_OUTLIER_GAIN = 2.0**9


def build_tiny_unet(seed: int = 0, *, overflow: bool = False, outliers: bool = False) -> Any:
    """The tiny pipeline's UNet (same seeded weights), optionally with the f16 overflow or activation outliers.

    Outliers: in every attention, the first value channel of each head is scaled by
    `_OUTLIER_GAIN`, so the output projection's input has a few channels ~500x the rest, the
    activation outliers of real diffusion transformers, its weights unchanged. f32 and f16 run
    it fine (the outliers stay ~1e3) and int8 weights barely notice (each weight row keeps its
    own scale), but one int8 scale per activation tensor rounds every other channel to 0.
    """
    from diffusers import UNet2DConditionModel

    config = _pipeline_unet_config(_PIPELINE_SHAPES["tiny"])
    unet = _seeded(lambda: UNet2DConditionModel(**config), "unet", seed, torch.float32)
    if overflow:
        resnet = unet.get_submodule(UNET_OVERFLOW_BLOCK)
        scale_layer_(resnet.conv1, _UNET_OVERFLOW_GAIN)
        scale_layer_(resnet.time_emb_proj, _UNET_OVERFLOW_GAIN)
    if outliers:
        with torch.no_grad():
            for module in unet.modules():
                if module.__class__.__name__ == "Attention":
                    channels = torch.arange(0, module.to_v.out_features, module.to_v.out_features // module.heads)
                    module.to_v.weight[channels] *= _OUTLIER_GAIN
                    if module.to_v.bias is not None:
                        module.to_v.bias[channels] *= _OUTLIER_GAIN
    return unet


# --------------------------------------------------------------------------- writing


_VARIANT_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({"fp16": torch.float16, "bf16": torch.bfloat16})


@contextmanager
def _atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``out_dir`` only if the block succeeds.

    An existing non-empty ``out_dir`` is refused rather than overwritten.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; remove it or choose another path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _as_dtype(module: Any, dtype: torch.dtype) -> Any:
    """``module`` in ``dtype`` without touching the caller's copy (copies only if needed)."""
    if not isinstance(module, nn.Module) or all(p.dtype == dtype for p in module.parameters()):
        return module
    return _cast(copy.deepcopy(module), dtype)


def write_pipeline(pipe: StableDiffusionXLPipeline, out_dir: Path, variant: str | None = None) -> Path:
    """Save ``pipe`` as safetensors under ``out_dir`` atomically.

    save_pretrained(variant=) only renames files: variants "fp16"/"bf16" are cast first
    (on copies; the caller's pipeline is unchanged), as the Hub's variant files are.
    """
    if variant in _VARIANT_DTYPES:
        cast = copy.copy(pipe)  # shallow; setattr re-registers the component on the copy only
        for name, component in pipe.components.items():
            setattr(cast, name, _as_dtype(component, _VARIANT_DTYPES[variant]))
        pipe = cast
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True, variant=variant)
    logger.info("wrote pipeline %s (variant %s)", out_dir, variant)
    return out_dir


def write_vae(vae: AutoencoderKL, out_dir: Path) -> Path:
    """Save a standalone VAE repo (config.json + diffusion_pytorch_model.safetensors) atomically."""
    return _write_model(vae, out_dir, "VAE")


def write_unet(unet: Any, out_dir: Path) -> Path:
    """Save a standalone UNet repo (for `substitutions.unet`) atomically."""
    return _write_model(unet, out_dir, "UNet")


def _write_model(model: Any, out_dir: Path, what: str) -> Path:
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    logger.info("wrote %s %s", what, out_dir)
    return out_dir


# --------------------------------------------------------------------------- generators (see convert.testing)


def tiny_sdxl_base(out_dir: Path, seed: int) -> Path:
    return write_pipeline(build_tiny_sdxl_pipeline(seed), out_dir)


def tiny_sdxl_vae_fp16_fix(out_dir: Path, seed: int) -> Path:
    return write_vae(fix_vae_for_fp16(build_overflow_vae("tiny", seed)), out_dir)


def tiny_sdxl_vae_offstream_overflow(out_dir: Path, seed: int) -> Path:
    return write_vae(build_offstream_overflow_vae("tiny", seed), out_dir)


def sdxl_base_shapes(out_dir: Path, seed: int) -> Path:
    return write_pipeline(build_full_sdxl_pipeline(seed, torch.float16), out_dir, variant="fp16")


def sdxl_vae_shapes(out_dir: Path, seed: int) -> Path:
    return write_vae(build_overflow_vae("full", seed), out_dir)


def sdxl_vae_shapes_fp16_fix(out_dir: Path, seed: int) -> Path:
    return write_vae(fix_vae_for_fp16(build_overflow_vae("full", seed)), out_dir)


def tiny_sdxl_unet(out_dir: Path, seed: int) -> Path:
    """The tiny pipeline's own UNet, standalone: the unscaled twin of the overflow one."""
    return write_unet(build_tiny_unet(seed), out_dir)


def tiny_sdxl_unet_fp16_overflow(out_dir: Path, seed: int) -> Path:
    return write_unet(build_tiny_unet(seed, overflow=True), out_dir)


def tiny_sdxl_unet_activation_outliers(out_dir: Path, seed: int) -> Path:
    """The tiny pipeline's UNet with activation outliers that per-tensor int8 cannot represent (same f32 output)."""
    return write_unet(build_tiny_unet(seed, outliers=True), out_dir)
