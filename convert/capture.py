"""Send the converters' own chatter (tracer warnings, NNCF tables, C++ logs) to a log file.

optimum, torch.jit, NNCF and OpenVINO write straight to the process's stdout/stderr,
some from C++; only a file-descriptor redirect catches all of it. That keeps `--json`
output parseable and the terminal readable; the log stays on disk for when a stage fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def redirect_output(log: Path) -> Iterator[Path]:
    """Redirect fds 1 and 2 (and Python's streams, which sit on them) into `log` until exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with log.open("ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield log
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
