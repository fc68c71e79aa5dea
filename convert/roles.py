"""What a source is for in a build: the base, its config repo, a substitute, or a LoRA.

Stages pass a `SourceRole` and ask it questions (`.component`, `.index`); only the edges
that write JSON (lock files, build.json, the card, cache keys, --json) use its `key`,
which is the string those files have always held ("base", "base.config",
"substitutions.vae", "lora.0"), so existing locks, cache keys and build ids are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RoleKind = Literal["base", "config", "substitution", "lora"]


@dataclass(frozen=True)
class SourceRole:
    kind: RoleKind
    component: str | None = None  # substitution: the diffusers component it replaces
    index: int | None = None  # lora: its position in the recipe's `lora` list

    def __post_init__(self) -> None:
        if (self.kind == "substitution") != (self.component is not None):
            raise ValueError(f"a {self.kind} role {'needs' if self.kind == 'substitution' else 'has no'} component")
        if (self.kind == "lora") != (self.index is not None):
            raise ValueError(f"a {self.kind} role {'needs' if self.kind == 'lora' else 'has no'} index")

    @classmethod
    def base(cls) -> SourceRole:
        return cls("base")

    @classmethod
    def config(cls) -> SourceRole:
        """The config and tokenizer source of a single-file base."""
        return cls("config")

    @classmethod
    def substitution(cls, component: str) -> SourceRole:
        return cls("substitution", component=component)

    @classmethod
    def lora(cls, index: int) -> SourceRole:
        return cls("lora", index=index)

    @property
    def key(self) -> str:
        """The role as lock files, build.json, the card and cache keys spell it."""
        if self.kind == "substitution":
            return f"substitutions.{self.component}"
        if self.kind == "lora":
            return f"lora.{self.index}"
        return "base.config" if self.kind == "config" else "base"

    @property
    def folder_name(self) -> str:
        """A file-system-safe name (`substitutions_vae`), for staging folders and adapter names."""
        return self.key.replace(".", "_")

    def __str__(self) -> str:
        return self.key
