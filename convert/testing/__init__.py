"""Offline fixtures: seeded generators of tiny and full-size pipelines, and IR parity helpers.

Used by tests, the benchmark and recipes with a `generated:` source; no stage imports the
generators except resolve, and only when a recipe names one. This module stays light (no
torch) because `--plan` needs a generated source's cache folder name, which carries the
generator's version: a hash of the generator modules' source, so changing a generator
invalidates its cached output without a number bumped by hand.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent


#: name -> (module, function, source files whose text is the generator's version)
_GENERATORS: Mapping[str, tuple[str, str, tuple[str, ...]]] = MappingProxyType({
    "tiny-sdxl-base": ("convert.testing.sdxl", "tiny_sdxl_base", ("sdxl.py",)),
    "tiny-sdxl-vae-fp16-fix": ("convert.testing.sdxl", "tiny_sdxl_vae_fp16_fix", ("sdxl.py", "../rescale.py")),
    "tiny-sdxl-vae-offstream-overflow": ("convert.testing.sdxl", "tiny_sdxl_vae_offstream_overflow", ("sdxl.py",)),
    "sdxl-base-shapes": ("convert.testing.sdxl", "sdxl_base_shapes", ("sdxl.py",)),
    "sdxl-vae-shapes": ("convert.testing.sdxl", "sdxl_vae_shapes", ("sdxl.py",)),
    "sdxl-vae-shapes-fp16-fix": ("convert.testing.sdxl", "sdxl_vae_shapes_fp16_fix", ("sdxl.py", "../rescale.py")),
    "tiny-sd35-medium": ("convert.testing.sd3", "tiny_sd35_medium", ("sd3.py", "sdxl.py")),
    "tiny-sd35-transformer-fp16-overflow": ("convert.testing.sd3", "tiny_sd35_transformer_fp16_overflow",
                                            ("sd3.py", "sdxl.py", "../rescale.py")),
    "tiny-sdxl-refiner": ("convert.testing.sdxl_refiner", "tiny_sdxl_refiner", ("sdxl_refiner.py", "sdxl.py")),
    "tiny-sdxl-unet": ("convert.testing.sdxl", "tiny_sdxl_unet", ("sdxl.py",)),
    "tiny-sdxl-unet-fp16-overflow": ("convert.testing.sdxl", "tiny_sdxl_unet_fp16_overflow", ("sdxl.py",)),
    "tiny-sdxl-unet-activation-outliers": ("convert.testing.sdxl", "tiny_sdxl_unet_activation_outliers", ("sdxl.py",)),
    "tiny-sdxl-single-file": ("convert.testing.single_file", "tiny_sdxl_single_file", ("single_file.py", "sdxl.py")),
    "tiny-sdxl-single-file-config": ("convert.testing.single_file", "tiny_sdxl_single_file_config",
                                     ("single_file.py", "sdxl.py")),
    "tiny-sdxl-lora": ("convert.testing.single_file", "tiny_sdxl_lora", ("single_file.py", "sdxl.py")),
    "sdxl-base-shapes-single-file": ("convert.testing.single_file", "sdxl_base_shapes_single_file",
                                     ("single_file.py", "sdxl.py")),
    "sdxl-shapes-lora": ("convert.testing.single_file", "sdxl_shapes_lora", ("single_file.py", "sdxl.py")),
    "tiny-sd15": ("convert.testing.sd15", "tiny_sd15", ("sd15.py", "sdxl.py")),
    "tiny-sd15-lcm": ("convert.testing.sd15", "tiny_sd15_lcm", ("sd15.py", "sdxl.py")),
    "tiny-sd15-single-file": ("convert.testing.sd15", "tiny_sd15_single_file", ("sd15.py", "sdxl.py", "single_file.py")),
    "tiny-sd15-config": ("convert.testing.sd15", "tiny_sd15_config", ("sd15.py", "sdxl.py", "single_file.py")),
})  # fmt: skip

GENERATORS: tuple[str, ...] = tuple(_GENERATORS)


def generator_version(name: str) -> str:
    """12 hex digits of the sha256 of the generator's source files."""
    digest = hashlib.sha256()
    for source in _spec(name)[2]:
        digest.update((_HERE / source).read_bytes())
    return digest.hexdigest()[:12]


def generate(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Run the generator ``name`` into ``out_dir`` (atomically; an existing non-empty folder is refused)."""
    module, function, _ = _spec(name)
    logger.info("generating %s (seed %d) into %s", name, seed, out_dir)
    result: Path = getattr(importlib.import_module(module), function)(Path(out_dir), seed)
    return result


def _spec(name: str) -> tuple[str, str, tuple[str, ...]]:
    try:
        return _GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic generator {name!r}; known: {', '.join(sorted(_GENERATORS))}") from None
