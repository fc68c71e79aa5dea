"""Offline community-checkpoint fixtures: an SDXL pipeline as one original-layout file, and LoRAs.

Community fine-tunes ship as one `.safetensors` file in the original (Stability / A1111 /
ComfyUI) key layout, with the overflow-prone VAE baked in; speed LoRAs ship in the
diffusers/peft or the kohya layout. The product never maps keys itself (diffusers'
`from_single_file` and `load_lora_weights` do); this module writes the inverse mapping
only to make such files from the seeded tiny pipeline, so tests can check that diffusers
reads back exactly the weights written.

The mapping covers the SDXL topology (3 UNet levels of 2 resnets, 4 VAE levels); it is
checked by the round trip test, not trusted.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from convert.testing.sdxl import _atomic_dir, build_full_sdxl_pipeline, build_tiny_sdxl_pipeline, write_pipeline

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

__all__ = [
    "CHECKPOINT", "LORA_DIFFUSERS", "LORA_KOHYA", "ldm_unet_vae_views", "original_sdxl_state_dict", "tiny_sdxl_lora",
    "sdxl_base_shapes_single_file", "tiny_sdxl_single_file", "tiny_sdxl_single_file_config", "write_single_file",
    "write_single_file_streaming", "sdxl_shapes_lora", "FULL_LORA", "FULL_LORA_RANK",
]  # fmt: skip

logger = logging.getLogger(__name__)

CHECKPOINT = "tiny-sdxl.safetensors"
FULL_CHECKPOINT = "sdxl-base-shapes.safetensors"
FULL_CONFIG = "config"  # subfolder of the full-size single-file output: configs and tokenizers, no weights
LORA_DIFFUSERS = "pytorch_lora_weights.safetensors"
LORA_KOHYA = "tiny-sdxl-lora-kohya.safetensors"

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _unet_prefixes(levels: int = 3, per_level: int = 2) -> dict[str, str]:
    """diffusers module prefix -> LDM (`openaimodel.UNetModel`) prefix, for SDXL's block layout."""
    out: dict[str, str] = {}
    for i in range(levels):
        for j in range(per_level):
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{3 * i + j + 1}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{3 * i + j + 1}.1."
        if i < levels - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{3 * (i + 1)}.0.op."
        for j in range(per_level + 1):
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{3 * i + j}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{3 * i + j}.1."
    out["mid_block.resnets.0."] = "middle_block.0."
    out["mid_block.attentions.0."] = "middle_block.1."
    out["mid_block.resnets.1."] = "middle_block.2."
    return out


def _unet_key(key: str, prefixes: Mapping[str, str], up_attention: Mapping[int, bool]) -> str:
    for hf, ldm in _UNET_TOP.items():
        if key.startswith(hf + "."):
            return ldm + key[len(hf):]
    if key.startswith("up_blocks.") and ".upsamplers.0." in key:
        level = int(key.split(".")[1])
        slot = 2 if up_attention[level] else 1
        return f"output_blocks.{3 * level + 2}.{slot}." + key.split(".upsamplers.0.", 1)[1]
    for hf, ldm in prefixes.items():
        if key.startswith(hf):
            rest = key[len(hf):]
            if ".resnets." in hf:
                for a, b in _RESNET:
                    rest = rest.replace(a + ".", b + ".", 1) if rest.startswith(a + ".") else rest
            return ldm + rest
    raise KeyError(f"no LDM name for UNet key {key}")


def _vae_key(key: str, levels: int) -> tuple[str, bool]:
    """(LDM name, whether the weight is a 1x1 conv in LDM) of a diffusers AutoencoderKL key."""
    k = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    parts = k.split(".")
    if parts[1] == "down_blocks":
        level, rest = parts[2], ".".join(parts[3:])
        rest = rest.replace("resnets.", "block.", 1).replace("downsamplers.0.", "downsample.", 1)
        k = f"{parts[0]}.down.{level}.{rest}"
    elif parts[1] == "up_blocks":
        level, rest = levels - 1 - int(parts[2]), ".".join(parts[3:])
        rest = rest.replace("resnets.", "block.", 1).replace("upsamplers.0.", "upsample.", 1)
        k = f"{parts[0]}.up.{level}.{rest}"
    elif parts[1] == "mid_block":
        if parts[2] == "resnets":
            k = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        else:
            rest = ".".join(parts[4:])
            for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            k = f"{parts[0]}.mid.attn_1.{rest}"
            return k, rest.endswith("weight") and not rest.startswith("norm.")
    return k, False


_OPEN_CLIP = (("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
              ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
              ("text_model.final_layer_norm.", "ln_final."))
_OPEN_CLIP_LAYER = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                    ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def _open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection -> OpenCLIP text tower (fused q/k/v, transposed projection)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        if key.endswith("position_ids"):
            continue
        hit = next((ldm + key[len(hf):] for hf, ldm in _OPEN_CLIP if key.startswith(hf)), None)
        if hit is not None:
            out[hit] = value
            continue
        layer, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
        prefix = f"transformer.resblocks.{layer}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault(prefix + "attn.in_proj_" + rest.rsplit(".", 1)[1], {})[rest.split(".")[1][0]] = value
            continue
        for a, b in _OPEN_CLIP_LAYER:
            if rest.startswith(a):
                rest = b + rest[len(a):]
        out[prefix + rest] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def original_sdxl_state_dict(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the keys of Stability's SDXL checkpoint (sgm `DiffusionEngine`)."""
    return {k: v.contiguous().clone() for k, v in original_sdxl_views(pipe).items()}


def write_single_file(pipe: StableDiffusionXLPipeline, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file(original_sdxl_state_dict(pipe), str(partial), metadata={"format": "pt"})
    partial.replace(path)
    return path


def original_sdxl_views(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original checkpoint's keys, as views of its own tensors (no copy).

    Only the OpenCLIP q/k/v concatenations and the transposed projection are new tensors, so at
    full size this costs a few hundred MB over the pipeline instead of a second 6.5 GiB.
    """
    out = ldm_unet_vae_views(pipe)
    for key, value in pipe.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            out[f"conditioner.embedders.0.transformer.{key}"] = value
    for key, value in _open_clip(pipe.text_encoder_2.state_dict()).items():
        out[f"conditioner.embedders.1.model.{key}"] = value
    return {k: v.detach() for k, v in out.items()}


def ldm_unet_vae_views(pipe: Any) -> dict[str, torch.Tensor]:
    """The UNet's and the VAE's weights under the LDM keys every Stability checkpoint uses (views, no copy)."""
    unet = pipe.unet
    up_attention = {i: hasattr(block, "attentions") for i, block in enumerate(unet.up_blocks)}
    prefixes = _unet_prefixes(len(unet.down_blocks), int(unet.config.layers_per_block))
    out = {f"model.diffusion_model.{_unet_key(k, prefixes, up_attention)}": v for k, v in unet.state_dict().items()}
    levels = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        name, conv = _vae_key(key, levels)
        out[f"first_stage_model.{name}"] = value.reshape(*value.shape, 1, 1) if conv else value
    return out


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_single_file_streaming(tensors: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Write a .safetensors file one tensor at a time (atomically), never holding a serialized copy.

    `safetensors.torch.save_file` turns every tensor into bytes before writing: at full size that
    is a second copy of the 6.5 GiB model. The format is a length-prefixed JSON header and the
    tensors' bytes back to back; the header is padded with spaces to 8 bytes as safetensors does.
    """
    names = sorted(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in names:
            f.write(tensors[name].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    partial.replace(path)
    return path


def write_configs(pipe: StableDiffusionXLPipeline, out_dir: Path) -> Path:
    """The pipeline's configs and tokenizers as a diffusers folder without weights (a config source)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_config(out_dir)
    for name, component in pipe.components.items():
        if component is None:
            continue
        if hasattr(component, "save_config"):  # diffusers models and the scheduler
            component.save_config(out_dir / name)
        elif hasattr(component, "config") and hasattr(component.config, "save_pretrained"):  # transformers models
            component.config.save_pretrained(out_dir / name)
        else:  # tokenizers
            component.save_pretrained(out_dir / name)
    return out_dir


def sdxl_base_shapes_single_file(out_dir: Path, seed: int) -> Path:
    """`sdxl-base-shapes` (same seeded fp16 weights) as ONE original-layout file, plus its config folder.

    For the benchmark of a full-size single-file convert. Written tensor by tensor: the peak is
    the fp16 pipeline (~7 GiB) plus the largest tensor, not twice the model.
    """
    pipe = build_full_sdxl_pipeline(seed, torch.float16)
    with _atomic_dir(out_dir) as tmp:
        write_single_file_streaming(original_sdxl_views(pipe), tmp / FULL_CHECKPOINT)
        write_configs(pipe, tmp / FULL_CONFIG)
    return out_dir


def tiny_sdxl_single_file(out_dir: Path, seed: int) -> Path:
    """A folder holding only `tiny-sdxl.safetensors`: the tiny pipeline, its overflow-prone VAE baked in."""
    with _atomic_dir(out_dir) as tmp:
        write_single_file(build_tiny_sdxl_pipeline(seed), tmp / CHECKPOINT)
    return out_dir


def tiny_sdxl_single_file_config(out_dir: Path, seed: int) -> Path:
    """The config source for the tiny single file: the diffusers folder's configs and tokenizers, no weights."""
    with _atomic_dir(out_dir) as tmp:
        write_pipeline(build_tiny_sdxl_pipeline(seed), tmp / "full")
        for path in (tmp / "full").rglob("*"):
            if path.is_file() and not path.name.endswith((".safetensors", ".bin")):
                target = tmp / path.relative_to(tmp / "full")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        shutil.rmtree(tmp / "full")
    return out_dir


# --------------------------------------------------------------------------- LoRAs

_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_sdxl_lora(out_dir: Path, seed: int) -> Path:
    """A rank-4 UNet LoRA made with peft, saved in the diffusers layout and the kohya layout.

    The LoRA's B matrices are seeded (peft starts them at zero, which would make a no-op LoRA).
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = build_tiny_sdxl_pipeline(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=_UNET_TARGETS, init_lora_weights=True))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    with _atomic_dir(out_dir) as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
        save_file(kohya_state_dict(layers, rank=4), str(tmp / LORA_KOHYA))
    return out_dir


#: Rank of the full-size LoRA: SDXL speed LoRAs (LCM-LoRA, Lightning) are rank 64.
FULL_LORA_RANK = 64
FULL_LORA = "sdxl-shapes-lora-kohya.safetensors"


def sdxl_shapes_lora(out_dir: Path, seed: int) -> Path:
    """A rank-64 kohya-layout LoRA on every attention projection of the full-size UNet (fp16, ~170 MB).

    Sized like a speed LoRA, for the full-size single-file + LoRA benchmark. Made without peft
    or real UNet weights: the UNet is built on the meta device for its layer names and shapes
    only, and the LoRA matrices are seeded small so the fused UNet stays near the base one.
    """
    from safetensors.torch import save_file

    unet = _full_unet_topology()
    generator = torch.Generator().manual_seed(seed + 1)
    layers: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(f".{t}" for t in _UNET_TARGETS)):
            down = torch.randn(FULL_LORA_RANK, module.in_features, generator=generator) * 0.01
            up = torch.randn(module.out_features, FULL_LORA_RANK, generator=generator) * 0.01
            layers[f"unet.{name}.lora.down.weight"] = down.half()
            layers[f"unet.{name}.lora.up.weight"] = up.half()
    with _atomic_dir(out_dir) as tmp:
        save_file(kohya_state_dict(layers, rank=FULL_LORA_RANK, unet=unet), str(tmp / FULL_LORA))
    return out_dir


def _full_unet_topology() -> Any:
    """The full-size UNet with parameters on the meta device: names and shapes, no storage."""
    from diffusers import UNet2DConditionModel

    from convert.testing.sdxl import _PIPELINE_SHAPES, _parameters_on_meta, _pipeline_unet_config

    config = _pipeline_unet_config(_PIPELINE_SHAPES["full"])
    with _parameters_on_meta():
        return UNet2DConditionModel(**config)


def kohya_state_dict(layers: Mapping[str, torch.Tensor], rank: int, unet: Any = None) -> dict[str, torch.Tensor]:
    """diffusers/peft UNet LoRA keys -> kohya's `lora_unet_<ldm module with _>.lora_down/up.weight` + alpha.

    ``unet`` gives the topology (default: the tiny pipeline's UNet).
    """
    unet = unet if unet is not None else build_tiny_sdxl_pipeline(0).unet
    up_attention = {i: hasattr(block, "attentions") for i, block in enumerate(unet.up_blocks)}
    prefixes = _unet_prefixes(len(unet.down_blocks), int(unet.config.layers_per_block))
    out: dict[str, torch.Tensor] = {}
    for key, value in layers.items():
        module, kind = re.split(r"\.lora[._]", key.removeprefix("unet."), maxsplit=1)
        ldm = _unet_key(module + ".weight", prefixes, up_attention).removesuffix(".weight")
        name = "lora_unet_" + ldm.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith(('A', 'down')) else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out
