"""One error hierarchy for every stage.

Each stage wraps third-party exceptions at its boundary into one of these, so the
CLI can print a single line (what failed, where, what to do) and map the class to
an exit code without knowing anything about diffusers, OpenVINO or the Hub client.
"""

from __future__ import annotations

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
        text = str(error).strip()
        first = text.splitlines()[0] if text else ""
        return cls(f"internal error: {type(error).__name__}: {first}" if first else f"internal error: {type(error).__name__}",
                   hint="run with -v for the traceback")


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`: what a stage wrapper shows of a third-party exception."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
