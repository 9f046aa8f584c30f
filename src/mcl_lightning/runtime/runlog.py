"""The run's log file holds the run: everything a training run prints also goes to Hydra's
``<run dir>/<job name>.log`` (``train.log``).

Hydra's job logging writes only Python ``logging`` records of loggers that propagate to the root;
the run's own lines are ``print``s (the config, the run directory, the resume, the summary table,
``error:`` lines) and Lightning's loggers do not propagate. ``RunLog`` copies ``sys.stdout`` and
``sys.stderr`` (warnings included) and Lightning's log records into the file, line by line, for the
duration of the job, and a traceback that ends the job. Progress-bar lines (redrawn in place with
``\\r``) stay on the console only. Only rank zero writes.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from lightning.pytorch.utilities import rank_zero_only

from mcl_lightning.core.errors import UserError

# Lightning logs to its own handlers and does not propagate to the root logger (Hydra's file handler)
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class _Tee:
    """A text stream that writes to ``stream`` and, a whole line at a time, to ``log`` (lines with a
    carriage return, a progress bar's redraws, are left out of the file)."""

    def __init__(self, stream: IO[str], log: IO[str]) -> None:
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if "\r" not in line:
                self.log.write(line + "\n")
        if lines:
            self.log.flush()
        return written

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def end(self) -> None:
        if self.pending and "\r" not in self.pending:
            self.log.write(self.pending + "\n")
        self.pending = ""

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the console's
        return getattr(self.stream, name)


class RunLog:
    """``with RunLog(path):`` the job's console output (and Lightning's log records) also goes to ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._saved: tuple[Any, Any] | None = None
        self._handler: logging.Handler | None = None

    def __enter__(self) -> "RunLog":
        if rank_zero_only.rank != 0:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")  # Hydra's handler appends to the same file
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._file), _Tee(sys.stderr, self._file)
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).addHandler(self._handler)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._file is None or self._saved is None:
            return
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Tee):
                stream.end()
        sys.stdout, sys.stderr = self._saved
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)
        if error is not None and not isinstance(error, (SystemExit, KeyboardInterrupt, UserError)):
            # a bug ends the job: its traceback (printed by Hydra after this) belongs in the log too
            self._file.write("".join(traceback.format_exception(kind, error, trace)))
        self._file.close()
        self._file = None
