"""The training-free FP16 fix of an SDXL-architecture VAE, chosen from measured activations.

Every reader of a VAE's residual stream is a GroupNorm or a linear map of it, and
GroupNorm(s*x) == GroupNorm(x) up to eps, so the stream can carry s*x instead of x without
changing the output: scale the weight and bias of the layers that write the stream
(conv_in, resnet conv2, attention to_out.0), the bias only of the layers that read and
write it (resampler convs, conv_shortcut), and the eps of the norms that read it by s**2.
A resnet's conv1 feeds only its norm2, so a large activation there (off the stream) takes
its own scale t the same way: conv1 weight and bias by t, norm2 eps by t**2.

Scales are powers of two, so the scaled weights are exact, and they are chosen from the
largest |activation| measured in f32 on real inputs, leaving `headroom` below the f16
maximum. After the change every module's output is measured again: a place no scale can
reach (a norm output, attention, conv_out) that still exceeds the limit is an error, not a
silently broken bundle.

diffusers hard-codes GroupNorm's eps, so a saved VAE loses the eps change; the tests
measure what that costs (the f32 output stays far above 60 dB from the original).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from convert.errors import PatchError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "F16_MAX", "Coder", "RescalePlan", "apply_rescale", "measure_peaks", "plan_rescale", "rescale_vae",
    "stream_passers", "stream_writers",
]  # fmt: skip

log = logging.getLogger(__name__)

F16_MAX = 65504.0
Coder = Literal["encoder", "decoder"]
CODERS: tuple[Coder, ...] = ("encoder", "decoder")


@dataclass(frozen=True)
class RescalePlan:
    """Scales for one VAE half, and the peaks they were chosen from (module path -> max |output|)."""

    coder: Coder
    stream_scale: float  # s: the residual stream carries s*x
    branch_scales: Mapping[str, float] = field(default_factory=dict)  # resnet path -> conv1 scale t
    peaks: Mapping[str, float] = field(default_factory=dict)
    headroom: float = 1.0
    scale_eps: bool = True

    @property
    def stream_peak(self) -> float:
        return max((v for k, v in self.peaks.items() if is_stream_place(k)), default=0.0)

    def describe(self) -> str:
        branches = ", ".join(f"{k}.conv1 x2^{int(math.log2(v))}" for k, v in sorted(self.branch_scales.items()))
        return (f"{self.coder}: stream x2^{int(math.log2(self.stream_scale))} (measured peak {self.stream_peak:.3g})"
                + (f"; off-stream {branches}" if branches else ""))


# ----------------------------------------------------------------------------- architecture


def _vae_block_classes() -> tuple[type, type, type, type]:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    return ResnetBlock2D, Attention, Upsample2D, Downsample2D


def _check_architecture(coder: nn.Module, name: str) -> None:
    """Refuse what the invariance argument does not cover (time embeddings, scaled outputs, spatial norms)."""
    resnet_cls, attention_cls, _, _ = _vae_block_classes()
    for path, module in coder.named_modules():
        where = f"vae.{name}.{path}"
        if isinstance(module, resnet_cls):
            if module.time_emb_proj is not None or module.output_scale_factor != 1 or not isinstance(module.norm2, nn.GroupNorm):
                raise PatchError(f"{where}: resnet is not the SDXL VAE kind (time embedding, output scale or norm)",
                                 hint="fp16_fix rescale supports SDXL-architecture VAEs only; use substitute or runtime-scale")
        elif isinstance(module, attention_cls):
            if getattr(module, "spatial_norm", None) is not None or module.rescale_output_factor != 1 or not module.residual_connection:
                raise PatchError(f"{where}: attention is not the SDXL VAE kind",
                                 hint="fp16_fix rescale supports SDXL-architecture VAEs only; use substitute or runtime-scale")


def _resnets_and_attentions(coder: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    resnet_cls, attention_cls, _, _ = _vae_block_classes()
    resnets = [(p, m) for p, m in coder.named_modules() if isinstance(m, resnet_cls)]
    attentions = [(p, m) for p, m in coder.named_modules() if isinstance(m, attention_cls)]
    return resnets, attentions


def stream_writers(coder: nn.Module) -> list[nn.Module]:
    """Layers whose whole output is added into the residual stream: scaled in weight and bias."""
    resnets, attentions = _resnets_and_attentions(coder)
    return [coder.conv_in, *(r.conv2 for _, r in resnets), *(a.to_out[0] for _, a in attentions)]


def stream_passers(coder: nn.Module) -> list[nn.Module]:
    """Layers that read the stream and write it back (linear in it): bias only."""
    _, _, up_cls, down_cls = _vae_block_classes()
    resnets, _ = _resnets_and_attentions(coder)
    samplers = [m.conv for m in coder.modules() if isinstance(m, (up_cls, down_cls)) and isinstance(m.conv, nn.Conv2d)]
    return samplers + [r.conv_shortcut for _, r in resnets if r.conv_shortcut is not None]


def stream_norms(coder: nn.Module) -> list[nn.GroupNorm]:
    """GroupNorms that read the stream: their eps scales with s**2."""
    resnets, attentions = _resnets_and_attentions(coder)
    return [*(r.norm1 for _, r in resnets), *(a.group_norm for _, a in attentions), coder.conv_norm_out]


def is_stream_place(path: str) -> bool:
    """Module paths whose output lies on (or is added into) the residual stream."""
    leaf = path.rsplit(".", 1)[-1]
    parts = path.split(".")
    if leaf in ("conv_in", "conv2", "conv_shortcut", "mid_block") or path.endswith("to_out.0"):
        return True
    if len(parts) >= 2 and parts[-2] in ("resnets", "attentions", "upsamplers", "downsamplers"):
        return True
    if len(parts) >= 3 and parts[-3] in ("upsamplers", "downsamplers") and leaf == "conv":
        return True
    return len(parts) == 3 and parts[1] in ("up_blocks", "down_blocks")


# ----------------------------------------------------------------------------- measuring


@contextmanager
def _peaks_of(model: nn.Module, prefix: str) -> Iterator[dict[str, float]]:
    """Max |output| of every submodule under `prefix`, via forward hooks removed on exit."""
    peaks: dict[str, float] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, _i: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                value = output.detach().abs().amax().float().item()
                peaks[name] = max(peaks.get(name, 0.0), value if math.isfinite(value) else math.inf)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n.startswith(prefix + ".")]
    try:
        yield peaks
    finally:
        for handle in handles:
            handle.remove()


Batches = torch.Tensor | Sequence[torch.Tensor]  # one batch, or batches of different sizes


def measure_peaks(vae: AutoencoderKL, coder: Coder, inputs: Batches) -> dict[str, float]:
    """Max |activation| per module of one VAE half, in f32, one input at a time.

    `inputs`: images in [-1, 1] for the encoder, decoder-space latents (pipeline latents
    divided by scaling_factor) for the decoder; several batches may differ in size (peaks
    grow with the image side, so measure at the sizes that will run).
    """
    with torch.no_grad(), _peaks_of(vae, coder) as peaks:
        for batch in [inputs] if isinstance(inputs, torch.Tensor) else inputs:
            for i in range(batch.shape[0]):
                x = batch[i : i + 1].float()
                vae.decode(x) if coder == "decoder" else vae.encode(x)
    return dict(peaks)


# ----------------------------------------------------------------------------- planning (pure)


def power_of_two_below(peak: float, headroom: float) -> float:
    """The largest 2**-k (k >= 0) with peak * 2**-k * headroom <= F16_MAX."""
    if not math.isfinite(peak):
        raise ValueError(f"peak {peak} is not finite: the f32 run itself overflows")
    need = peak * headroom / F16_MAX
    return 1.0 if need <= 1 else 2.0 ** -math.ceil(math.log2(need))


def plan_rescale(coder: Coder, peaks: Mapping[str, float], headroom: float, *, off_stream: bool = True,
                 scale_eps: bool = True) -> RescalePlan:
    """Scales from measured peaks: one for the stream, one per resnet whose conv1 is too large."""
    prefix = coder + "."
    own = {k: v for k, v in peaks.items() if k.startswith(prefix)}
    stream = max((v for k, v in own.items() if is_stream_place(k)), default=0.0)
    branches: dict[str, float] = {}
    if off_stream:
        for path, peak in own.items():
            if path.endswith(".conv1") and (t := power_of_two_below(peak, headroom)) < 1:
                branches[path.removesuffix(".conv1")] = t
    return RescalePlan(coder, power_of_two_below(stream, headroom), branches, own, headroom, scale_eps)


# ----------------------------------------------------------------------------- applying


@torch.no_grad()
def scale_layer_(layer: nn.Module, factor: float, weight: bool = True) -> None:
    """Scale a layer's output in place; `weight=False` scales only the bias (layers that pass the stream through)."""
    if weight:
        layer.weight.mul_(factor)
    if layer.bias is not None:
        layer.bias.mul_(factor)


def apply_rescale(vae: AutoencoderKL, plans: list[RescalePlan]) -> AutoencoderKL:
    """A rescaled copy of `vae` (the original is untouched); force_upcast becomes False."""
    fixed = copy.deepcopy(vae)
    for plan in plans:
        coder = getattr(fixed, plan.coder)
        _check_architecture(coder, plan.coder)
        s = plan.stream_scale
        for writer in stream_writers(coder):
            scale_layer_(writer, s)
        for passer in stream_passers(coder):
            scale_layer_(passer, s, weight=False)
        if plan.scale_eps:
            for norm in stream_norms(coder):
                norm.eps *= s * s
        for path, t in plan.branch_scales.items():
            resnet = coder.get_submodule(path.removeprefix(plan.coder + "."))
            scale_layer_(resnet.conv1, t)
            if plan.scale_eps:
                resnet.norm2.eps *= t * t
    fixed.register_to_config(force_upcast=False)
    return fixed


def out_of_range(peaks: Mapping[str, float], headroom: float) -> dict[str, float]:
    """Places whose measured peak leaves less than `headroom` below the f16 maximum."""
    return {k: v for k, v in peaks.items() if not v * headroom <= F16_MAX}


def rescale_vae(vae: AutoencoderKL, inputs: Mapping[Coder, Batches], headroom: float
                ) -> tuple[AutoencoderKL, list[RescalePlan]]:
    """Measure, plan, apply and re-measure: the FP16-safe twin of `vae` and the plans used.

    Raises PatchError naming the module if some place still exceeds F16_MAX / headroom.
    """
    plans = [plan_rescale(c, measure_peaks(vae, c, x), headroom) for c, x in inputs.items()]
    fixed = apply_rescale(vae, plans)
    for plan in plans:
        after = out_of_range(measure_peaks(fixed, plan.coder, inputs[plan.coder]), headroom)
        if after:
            worst = max(after, key=lambda k: after[k])
            raise PatchError(
                f"vae.{worst}: max |activation| {after[worst]:.3g} still above {F16_MAX:g}/{headroom:g} after "
                f"rescaling ({len(after)} place(s)); no stream or conv1 scale reaches it",
                hint="substitute an FP16-fixed VAE (substitutions.vae) or use fp16_fix: runtime-scale",
            )
        log.info("rescaled %s", plan.describe())
    return fixed, plans


def stream_only_plan(coder: Coder, scale: float, scale_eps: bool = False) -> RescalePlan:
    """A fixed stream scale and no off-stream scales: the classic fix (and the synthetic fixture's)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return RescalePlan(coder, scale, {}, {}, 1.0, scale_eps)


def vae_inputs(vae: AutoencoderKL, images: Any) -> dict[Coder, torch.Tensor]:
    """Encoder inputs (images in [-1, 1]) and decoder inputs (their f32 latent means)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x[i : i + 1]).latent_dist.mean for i in range(x.shape[0])])
    return {"encoder": x, "decoder": latents}
