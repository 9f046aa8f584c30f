"""A Hydra multirun of the training entry point on the joblib launcher, from another process: the
command, a progress line while it runs, and the results.json of each job afterwards
(``mcl_lightning.reproduce`` runs its probes and its study this way).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mcl_lightning.core.errors import ConfigError

HEARTBEAT_S = 30.0


class StudyFailed(RuntimeError):
    """A probe or the study's multirun failed (not a configuration mistake): exit status 1 with its log."""


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merged(base: list[str], user: list[str]) -> list[str]:
    """``base`` overrides less those ``user`` sets, then ``user``'s (Hydra refuses a key set twice)."""
    keys = {override_key(o) for o in user}
    return [o for o in base if override_key(o) not in keys] + user


def missing_launcher_packages() -> list[str]:
    """The packages the joblib launcher needs that this interpreter cannot import (Hydra would only
    fail inside the multirun, after the work before it)."""
    needs = {"hydra-joblib-launcher": "hydra_plugins.hydra_joblib_launcher", "joblib": "joblib"}
    missing = []
    for package, module in needs.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent namespace (hydra_plugins) is absent
            found = False
        if not found:
            missing.append(package)
    return missing


def require_launcher() -> None:
    """One clear error, before any work, when the joblib launcher cannot run here."""
    missing = missing_launcher_packages()
    if missing:
        raise ConfigError(f"the study runs on Hydra's joblib launcher, and {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {' '.join(missing)}")


def multirun(out: Path, log: Path, concurrency: int, sweep: list[str], overrides: list[str],
             heartbeat: str, expected: int, on_progress: Callable[[], None] | None = None) -> int:
    """One Hydra multirun of ``mcl_lightning.train`` on the joblib launcher; output to ``log``,
    a progress line every 30 s, ``on_progress`` called whenever another job has written its
    results.json. Returns the exit status."""
    command = [sys.executable, "-m", "mcl_lightning.train", "-m", "hydra/launcher=joblib",
               f"hydra.launcher.n_jobs={concurrency}", f"hydra.sweep.dir={out}", *sweep, *overrides]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = last_beat = time.monotonic()
    seen = 0
    with log.open("w") as stream:
        stream.write(" ".join(command) + "\n")
        stream.flush()
        proc = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            done = len(list(out.glob("*/results.json")))
            if done != seen and on_progress is not None:
                seen = done
                on_progress()
            if time.monotonic() - last_beat >= HEARTBEAT_S and proc.poll() is None:
                last_beat = time.monotonic()
                print(f"{heartbeat}: {done}/{expected} runs finished, {last_beat - start:.0f} s", flush=True)
    return proc.returncode


def read_runs(folder: Path) -> dict[int, dict[str, Any]]:
    """results.json of each job of a multirun, by job number (its position in the sweep)."""
    runs = {}
    for path in folder.glob("*/results.json"):
        if path.parent.name.isdigit():
            runs[int(path.parent.name)] = {**json.loads(path.read_text()), "_path": str(path)}
    return runs
