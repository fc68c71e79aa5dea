"""The registry of model families: the recipe's `pipeline:` value -> its `PipelineFamily` record.

Adding a family is one module here with its record, one line below, an offline
generator for tests, a recipe and tests; no stage changes (README "Model families").
"""

from __future__ import annotations

from convert.families.base import GateSpec, LatentSpace, PipelineFamily, SubmodelSpec
from convert.families.sd3 import SD3
from convert.families.sd15 import SD15, SD15_LCM
from convert.families.sdxl import SDXL
from convert.families.sdxl_refiner import SDXL_REFINER

FAMILIES: dict[str, PipelineFamily] = {family.name: family for family in (SDXL, SDXL_REFINER, SD3, SD15, SD15_LCM)}


def get_family(name: str) -> PipelineFamily:
    """The family a recipe names; the recipe validator has already checked the name exists."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown pipeline family {name!r}; known: {', '.join(FAMILIES)}") from None


def register(family: PipelineFamily) -> PipelineFamily:
    """Add a family at run time (plugins, tests); a name already taken is refused."""
    if family.name in FAMILIES:
        raise ValueError(f"pipeline family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


def family_of_class(class_name: str) -> PipelineFamily | None:
    """The family whose diffusers pipeline class a model_index.json names, if any."""
    return next((f for f in FAMILIES.values() if f.diffusers_class == class_name), None)


__all__ = ["FAMILIES", "GateSpec", "LatentSpace", "PipelineFamily", "SubmodelSpec", "family_of_class", "get_family", "register",
           "unregister"]
