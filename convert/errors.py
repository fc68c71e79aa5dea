"""One error hierarchy for every stage.

Each stage wraps third-party exceptions at its boundary into one of these, so the
CLI can print a single line (what failed, where, what to do) and map the class to
an exit code without knowing anything about diffusers, OpenVINO or the Hub client.
"""

from __future__ import annotations

import re
from pathlib import Path


class ConvertError(Exception):
    """Root of every error the tool reports to a user; `str()` is the one-line message."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None, path: Path | str | None = None) -> None:
        self.message = message
        self.hint = hint
        self.path = Path(path) if path is not None else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        fix = f"; {self.hint}" if self.hint else ""
        return f"{where}{self.message}{fix}"


class RecipeError(ConvertError):
    """The recipe file is missing, malformed, or names something that does not exist."""

    exit_code = 2


class FetchError(ConvertError):
    """A source could not be resolved or downloaded, or refused as unsafe (pickle weights)."""

    exit_code = 3


class PatchError(ConvertError):
    """A substituted component does not fit the base pipeline."""

    exit_code = 4


class ExportError(ConvertError):
    """A submodel could not be converted to OpenVINO IR or compressed."""

    exit_code = 5


class ValidationError(ConvertError):
    """The validation stage could not run (OpenVINO or input errors): nothing was judged."""

    exit_code = 6


class ValidationFailed(ConvertError):
    """The validation gate refused the build; it was moved aside and must not be published."""

    exit_code = 6

    def __init__(self, failures: list[str], *, path: Path | str | None = None) -> None:
        self.failures = list(failures)
        super().__init__("; ".join(self.failures) or "validation failed", path=path)


class PackageError(ConvertError):
    """The bundle could not be written or does not verify against its manifest."""

    exit_code = 7


class ResourcesError(PackageError):
    """The build would not fit this machine's memory or disk: refused before it starts (exit 7, like
    every other "cannot write the bundle" error)."""


class PublishError(ConvertError):
    """Publishing to the Hub failed or was refused."""

    exit_code = 8


class BusyError(ConvertError):
    """Another live process is building the same recipe into the same artifacts folder.

    75 is sysexits' EX_TEMPFAIL: nothing is wrong with the input, retry once the other build ends.
    """

    exit_code = 75


class UsageError(ConvertError):
    """The command line itself is wrong (argparse); 64 is sysexits' EX_USAGE."""

    exit_code = 64


class InternalError(ConvertError):
    """An exception no stage expected: a bug of ours or of a library, reported in one line."""

    exit_code = 1

    @classmethod
    def of(cls, error: BaseException) -> InternalError:
        return cls(f"internal error: {first_line(error)}", hint="run with -v for the traceback")


#: OpenVINO prefixes its messages with the C++ source locations they passed through.
_SOURCE_LOCATION = re.compile(r"^(Exception from |Check '.*' failed at )\S+:\d+:$")


def first_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line` of a third-party exception, as a stage wrapper shows it.

    OpenVINO's "Exception from src/...:117:" location lines are skipped and a line ending in
    ":" takes the next one along, so the line says what went wrong ("Unsupported element
    type: bogus"), not where in C++.
    """
    lines = [ln.strip() for ln in str(error).splitlines()]
    kept = [ln for ln in lines if ln and not _SOURCE_LOCATION.match(ln)]
    text = ""
    for line in kept:
        text = f"{text} {line}".strip()
        if not line.endswith(":"):
            break
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
