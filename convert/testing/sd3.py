"""A seeded, offline tiny Stable Diffusion 3.5 Medium pipeline (the second family's test input).

SD3.5 Medium's architecture in miniature: an MMDiT-X transformer (dual attention in its
first layer, RMS q/k norm), CLIP-L and OpenCLIP-G text towers with projection, a T5
v1.1-style encoder (gated GELU) behind a tiny Unigram tokenizer built without any
download, and a 16-channel VAE with a `shift_factor`. Weights are seeded per parameter as
in :mod:`convert.testing.sdxl`, so the files are bitwise reproducible. The VAE is a plain
seeded one: SD3's VAE is reported FP16-safe, and the gate must show that per build.
"""

from __future__ import annotations

import string
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from convert.rescale import scale_layer_
from convert.testing.sdxl import _MAX_LENGTH, _seeded, _write_model, build_tokenizers, write_pipeline

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5Tokenizer

T5_MAX_LENGTH = 256  # what StableDiffusion3Pipeline feeds T5 by default (max_sequence_length)

#: Words of the test prompts as whole pieces; everything else falls back to single letters.
_T5_WORDS = ("a", "an", "photo", "of", "cat", "astronaut", "riding", "horse", "the", "and")

_TINY = MappingProxyType({
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "hidden_act": "quick_gelu"},
    "text_encoder_2": {"hidden_size": 64, "intermediate_size": 128, "projection_dim": 64, "hidden_act": "gelu"},
    "t5": {"d_model": 96, "d_kv": 8, "d_ff": 128, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16},
})  # fmt: skip
#: scheduler/scheduler_config.json of SD3.5 Medium
_SCHEDULER = MappingProxyType({"num_train_timesteps": 1000, "shift": 3.0})


def build_t5_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram, sentencepiece-style) tokenizer over a ~100-piece vocab, made offline.

    transformers 5 builds T5Tokenizer from a (piece, score) list with the `tokenizers`
    library; it saves tokenizer.json only (no spiece.model), which openvino-tokenizers
    converts through its Unigram step.
    """
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -2.0) for w in _T5_WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ".,!?'-"]
    pieces += [(f"▁{c}", -4.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip(settings: dict[str, Any], tokenizer: Any, name: str, seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        **settings, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tokenizer),
        max_position_embeddings=_MAX_LENGTH, layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return _seeded(lambda: CLIPTextModelWithProjection(config), name, seed, torch.float32)


def _t5(tokenizer: Any, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**_TINY["t5"], vocab_size=len(tokenizer), feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return _seeded(lambda: T5EncoderModel(config), "text_encoder_3", seed, torch.float32)


def _vae(seed: int) -> Any:
    """SD3's VAE config (16 latent channels, scaling and shift factors, no quant convs), narrow."""
    from diffusers import AutoencoderKL

    config = {
        "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 64, 64], "norm_num_groups": 8, "sample_size": 64,
        "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False,
        "force_upcast": True,
    }  # fmt: skip
    return _seeded(lambda: AutoencoderKL(**config), "vae", seed, torch.float32)


def build_tiny_transformer(seed: int = 0, *, overflow: bool = False) -> Any:
    """The tiny pipeline's MMDiT-X transformer (seeded), optionally with an f16 overflow built in.

    The overflow: `TRANSFORMER_OVERFLOW_BLOCK`'s query projection scaled by 2**18. Its output
    feeds only the RMS q-norm, which divides the scale out (f32 output unchanged up to the norm's
    eps), while at f16 the scaled queries (~2**18) are inf and the norm makes them NaN: a
    fine-tune whose attention logits grew out of f16's range.
    """
    from diffusers import SD3Transformer2DModel

    te, te2, t5 = _TINY["text_encoder"], _TINY["text_encoder_2"], _TINY["t5"]
    transformer = _seeded(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=t5["d_model"], caption_projection_dim=32,
        pooled_projection_dim=te["projection_dim"] + te2["projection_dim"], pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    ), "transformer", seed, torch.float32)  # fmt: skip
    if overflow:
        with torch.no_grad():
            scale_layer_(transformer.get_submodule(TRANSFORMER_OVERFLOW_BLOCK).attn.to_q, _TRANSFORMER_OVERFLOW_GAIN)
    return transformer


#: the transformer block whose queries overflow f16 in `build_tiny_transformer(overflow=True)`, and by how much
TRANSFORMER_OVERFLOW_BLOCK = "transformer_blocks.1"
_TRANSFORMER_OVERFLOW_GAIN = 2.0**18


def build_tiny_sd35_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A few-MB SD3.5-Medium-shaped pipeline (f32, 64x64 native), all three text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = build_tokenizers()
    tokenizer_3 = build_t5_tokenizer()
    te, te2 = _TINY["text_encoder"], _TINY["text_encoder_2"]
    transformer = build_tiny_transformer(seed)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER), vae=_vae(seed),
        text_encoder=_clip(te, tokenizer, "text_encoder", seed), tokenizer=tokenizer,
        text_encoder_2=_clip(te2, tokenizer_2, "text_encoder_2", seed), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3, seed), tokenizer_3=tokenizer_3,
    )  # fmt: skip


def tiny_sd35_medium(out_dir: Path, seed: int) -> Path:
    return write_pipeline(build_tiny_sd35_pipeline(seed), out_dir)  # type: ignore[arg-type]


def tiny_sd35_transformer_fp16_overflow(out_dir: Path, seed: int) -> Path:
    """The tiny SD3.5 transformer with its f16 overflow, alone (for `substitutions.transformer`)."""
    return _write_model(build_tiny_transformer(seed, overflow=True), out_dir, "transformer")
