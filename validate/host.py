"""The CPU the gate runs on, and compiling the gate's graphs so that they build on every x86-64 ISA.

Why this module exists: the f16 emulation (validate/precision.py) puts a short rounding chain
after every value-producing op. OpenVINO's CPU plugin fuses chains of element-wise ops into
JIT kernels ("snippets"), and its register allocator cannot spill: where a fused chain needs
more vector registers than the ISA has, the compile fails with "Can't allocate registers for a
snippet". AVX-512 has 32 vector registers, AVX2 16. On AVX2 (OpenVINO 2026.4.1) the SDXL UNet's
time embedding plus added-condition embedding (two rounded bias Adds, their sum, a Swish) fused
into one snippet is enough to fail; found by bisecting the tiny UNet's rounding points.

The fix keeps the fused emulation wherever it compiles (it is the cheapest form: measured in the
README's "CPUs the gate runs on") and, only for a graph whose compile hits that error,
recompiles it in the bounded form: each rounding's NaN guard becomes IsNaN, an op the snippets
tokenizer does not fuse, so no snippet spans more than one emulated op between two roundings and
its register need no longer grows with the chain. If even that fails, the last resort compiles
with the CPU plugin's snippets switched off (SNIPPETS_MODE=DISABLE), which costs the most memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # openvino is imported where a graph is touched: the ISA is asked for by light paths too
    import openvino as ov

log = logging.getLogger(__name__)

MARK = "__emulated__"  # in the friendly name of every node the emulation (validate/precision.py) inserts
REGISTER_POOL_ERROR = "Can't allocate registers for a snippet"
#: ONEDNN_MAX_CPU_ISA values that keep oneDNN (and OpenVINO's JIT) below AVX-512: 16 vector registers
_BELOW_AVX512 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"})


@dataclass(frozen=True)
class CpuIsa:
    """The instruction set OpenVINO's CPU plugin can use here, as the gate reports it."""

    name: str  # AVX2, AVX-512, AVX-512+BF16, AVX512_FP16 (+AMX)
    vector_registers: int  # 16 (AVX2) or 32 (AVX-512): what bounds a fused snippet
    limited_by: str | None = None  # ONEDNN_MAX_CPU_ISA when set: OpenVINO's JIT then uses less than the CPU has

    def describe(self) -> str:
        limit = f", OpenVINO limited to {self.limited_by} by ONEDNN_MAX_CPU_ISA" if self.limited_by else ""
        return f"{self.name} ({self.vector_registers} vector registers{limit})"


def _cpuid_features() -> frozenset[str]:
    """Features numpy detected with CPUID at import: true under an emulator too, unlike /proc/cpuinfo."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy moved its private table: fall back to the kernel's view
        return frozenset(flag.upper() for flag in cpu_flags())
    return frozenset(name for name, present in __cpu_features__.items() if present)


def cpu_flags() -> frozenset[str]:
    """The kernel's CPU flags (/proc/cpuinfo; empty where it does not exist): AMX needs kernel support too."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return frozenset()


def isa_of(features: frozenset[str], kernel_flags: frozenset[str], max_isa: str | None) -> CpuIsa:
    """The ISA name from CPUID features (numpy's names), AMX from the kernel's flags, and a oneDNN limit.

    Pure, so every ISA can be tested on any host.
    """
    if "AVX512F" not in features:
        name = "AVX2" if "AVX2" in features else "pre-AVX2 x86-64"
    elif {"AVX512FP16", "AVX512_SPR"} & features:
        name = "AVX512_FP16"
    elif "AVX512BF16" in features:
        name = "AVX-512+BF16"
    else:
        name = "AVX-512"
    if "AVX512F" in features and {"amx_bf16", "amx_fp16", "amx_int8"} & kernel_flags:
        name += "+AMX"
    below = max_isa.strip().upper() in _BELOW_AVX512 if max_isa else False  # oneDNN ignores names it does not know
    limited = max_isa.strip().upper() if below and max_isa and "AVX512F" in features else None
    registers = 32 if "AVX512F" in features and not limited else 16
    return CpuIsa(name, registers, limited)


def cpu_isa() -> CpuIsa:
    """This host's ISA as OpenVINO's CPU plugin sees it."""
    return isa_of(_cpuid_features(), cpu_flags(), os.environ.get("ONEDNN_MAX_CPU_ISA"))


def failed_check(error: BaseException | None) -> str:
    """The check that failed: the last line of OpenVINO's multi-line message."""
    lines = str(error or "").strip().splitlines()
    return lines[-1] if lines else ""


def openvino_version() -> str:
    """OpenVINO's version string, for error lines (its snippets and ISA support change between releases)."""
    import openvino

    return str(openvino.get_version()).split("-", 1)[0]


def is_register_pool_error(error: BaseException) -> bool:
    """The CPU plugin's snippet register allocator ran out (a fused chain too long for the ISA)."""
    return isinstance(error, RuntimeError) and REGISTER_POOL_ERROR in str(error)


def nan_guards(graph: ov.Model) -> list[ov.Node]:
    """The f16 emulation's NaN guards in their fused form: NotEqual(h, h) inserted by the emulation."""
    return [node for node in graph.get_ordered_ops()
            if node.get_type_name() == "NotEqual" and MARK in node.get_friendly_name()
            and node.input_value(0) == node.input_value(1)]


def bounded_form(graph: ov.Model) -> ov.Model | None:
    """A copy of an f16-emulated graph whose NaN guards are IsNaN (never fused by snippets); None if it has none.

    Same values: IsNaN(h) and h != h are true for exactly the NaNs. The bf16 emulation's
    chain (abs, three compares, eight constants) needs more than 16 registers on its own, so
    cutting it between roundings does not help: on AVX2 it falls back to snippets disabled.
    """
    import openvino.opset13 as ops

    if not nan_guards(graph):
        return None
    bounded = graph.clone()
    for node in nan_guards(bounded):
        cut = ops.is_nan(node.input_value(0))
        cut.set_friendly_name(node.get_friendly_name() + "/IsNaN")
        node.output(0).replace(cut.output(0))
    return bounded


# Per process, like the CPU itself: emulated graphs (named by their NaN guards, which a tapped copy
# shares) whose fused form ran out of registers here. The gate compiles the same submodel several
# times (replay, taps, end to end); a failed fused compile of the full-size UNet costs ~45 s of
# compile on AVX2 (16-core Xeon), so it is paid once per submodel, not per compile.
_NEEDS_BOUNDED: set[int] = set()


def _guard_key(graph: ov.Model) -> int:
    return hash(frozenset(node.get_friendly_name() for node in nan_guards(graph)))


@dataclass(frozen=True)
class HostCompiled:
    """A compiled gate graph and how it had to be compiled on this CPU (None: as given)."""

    compiled: ov.CompiledModel
    fallback: str | None = None


def compile_on_host(core: ov.Core, graph: ov.Model, device: str, config: Mapping[str, Any]) -> HostCompiled:
    """`core.compile_model`, recompiling in the bounded form (then without snippets) where the CPU lacks registers.

    Only the register-pool error is retried: any other error, or one on a device other than
    the CPU, propagates as it is.
    """
    known = bool(_NEEDS_BOUNDED) and device.startswith("CPU") and _guard_key(graph) in _NEEDS_BOUNDED
    first: RuntimeError | None = None
    if not known:
        try:
            return HostCompiled(core.compile_model(graph, device, dict(config)))
        except RuntimeError as e:
            if not (device.startswith("CPU") and is_register_pool_error(e)):
                raise
            first = e
    isa = cpu_isa().describe()
    bounded = bounded_form(graph)
    if bounded is not None:
        try:
            compiled = core.compile_model(bounded, device, dict(config))
        except RuntimeError as e:
            if not is_register_pool_error(e):
                raise
            first = first or e
        else:
            if not known:
                _NEEDS_BOUNDED.add(_guard_key(graph))
                log.info("%s: fused f16 emulation needs more vector registers than %s has; compiled with "
                         "unfused NaN guards", graph.get_friendly_name(), isa)
            return HostCompiled(compiled, "unfused NaN guards")
    log.warning("%s: snippets need more vector registers than %s has, even with unfused NaN guards; compiling "
                "with SNIPPETS_MODE=DISABLE (%s)", graph.get_friendly_name(), isa, failed_check(first))
    compiled = core.compile_model(bounded or graph, device, {**dict(config), "SNIPPETS_MODE": "DISABLE"})
    return HostCompiled(compiled, "snippets disabled")
