"""What ``mcl_lightning.gpu_evidence`` needs around its children, for a short GPU slot that copies back
only a few files: files replaced at once, a child process with a hard deadline, the GPU as
``nvidia-smi`` names it, and everything else packed into one archive without checkpoints.

A slot copies back at most 8 files from its output folder, 16 MiB each, so the summaries sit at its top
and the rest (logs, every run's results.json, curves, metrics) goes into one ``.tar.gz``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

ARCHIVE = "gpu-evidence.tar.gz"
ARCHIVE_LIMIT = 15 << 20  # under the slot's 16 MiB per file, with room for the tar headers
EXCLUSIVE_MODES = ("Exclusive_Process", "Exclusive_Thread", "Prohibited")


def copy_file(source: Path, target: Path) -> bool:
    """``source`` to ``target``, replaced at once; False when there is no ``source`` yet."""
    if not source.is_file():
        return False
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return True


def run_child(command: list[str], log: Path, deadline: float, on_line: Callable[[], None] | None = None) -> int | None:
    """Run ``command`` in its own process group, its output on our stdout and in ``log`` (``on_line``
    called after each line); the whole group is killed at ``deadline`` (time.monotonic()). The exit
    status, or None when the deadline killed it."""
    with log.open("w") as file:
        file.write(" ".join(command) + "\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)  # readline below must not outlive the deadline
        killed = False
        try:
            while True:
                line = proc.stdout.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    file.write(line)
                    file.flush()
                    if on_line is not None:
                        on_line()
                    continue
                if proc.poll() is not None:
                    break
                if time.monotonic() >= deadline:
                    killed = True
                    message = f"killed at its time limit ({command[2] if len(command) > 2 else command[0]})\n"
                    file.write(message)
                    sys.stdout.write(message)
                    break
                time.sleep(0.1)
        finally:
            if killed or proc.poll() is None:  # our own kill (SIGTERM from a timeout) also ends the group
                kill_group(proc)
        rest = proc.stdout.read() or ""
        file.write(rest)
        sys.stdout.write(rest)
    return None if killed else proc.returncode


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc``'s process group (training runs save and stop), SIGKILL 5 s later."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def nvidia_smi() -> dict[str, Any]:
    """The GPU's name and compute mode as ``nvidia-smi`` reports them (``error`` when it cannot)."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_mode,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[-300:] or f"exit status {proc.returncode}"}
    gpus = []
    for line in proc.stdout.strip().splitlines():
        name, mode, memory = ([part.strip() for part in line.split(",")] + ["", ""])[:3]
        gpus.append({"name": name, "compute_mode": mode, "memory_total": memory})
    return {"gpus": gpus}


def compute_mode_problem(smi: dict[str, Any], concurrent: bool) -> str | None:
    """Why the study cannot share the GPU as planned (None: it can): in an exclusive compute mode one
    process at a time may use the GPU, so concurrent runs would fail one by one after the benchmark."""
    for gpu in smi.get("gpus", [])[:1]:
        if gpu["compute_mode"] == "Prohibited":
            return "the GPU's compute mode is Prohibited: no process may use it (nvidia-smi -c DEFAULT, as root)"
        if concurrent and gpu["compute_mode"] in EXCLUSIVE_MODES:
            return (f"the GPU is in {gpu['compute_mode']} compute mode, so the study's concurrent runs cannot share it: "
                    "set it to Default (nvidia-smi -c DEFAULT, as root) or pass --reproduce-args '--concurrency 1'")
    return None


def pack(work: Path, archive: Path, limit: int = ARCHIVE_LIMIT) -> dict[str, Any]:
    """Everything under ``work`` but checkpoints into ``archive`` (a .tar.gz, replaced at once), smallest
    files first, leaving out what would take it past ``limit`` bytes; what went in and what did not."""
    files = sorted((p for p in work.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(work).parts
                    and not p.name.endswith((".ckpt", ".partial", ".tmp"))), key=lambda p: p.stat().st_size)
    partial = archive.with_name(archive.name + ".partial")
    packed, left_out = 0, []
    with tarfile.open(partial, "w:gz") as tar:
        for path in files:
            # as if the file did not compress at all: the archive stays under the limit whatever it holds
            if partial.stat().st_size + path.stat().st_size + 4096 > limit:
                left_out.append(str(path.relative_to(work)))
                continue
            tar.add(path, arcname=str(Path(work.name) / path.relative_to(work)))
            packed += 1
    os.replace(partial, archive)
    return {"archive": archive.name, "files": packed, "bytes": archive.stat().st_size, "left_out": left_out}
