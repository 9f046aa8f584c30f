"""Kill-safe checkpoints: atomic writes, step checkpoints, SIGTERM, and finding the newest one.

- ``AtomicCheckpointIO``: every checkpoint is written to a temporary file beside its target,
  flushed to disk, then renamed over it; a crash while writing leaves the previous file intact.
- ``BestCheckpoint``: Lightning's ``ModelCheckpoint``, quiet (one line) in a run that never validated.
- ``LastCheckpoint``: replaces ``<dir>/last.ckpt`` at the end of every epoch (after validation and
  after ModelCheckpoint's best), every N optimizer steps, and, when the process gets SIGTERM (what
  schedulers send before a kill), after the step in progress; then it stops the run with
  ``Preempted``. (Lightning 2.6's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only
  in epochs that also write a best checkpoint.) Resuming from such a mid-epoch checkpoint continues at the next batch of
  the same epoch order (``data.resumable``), with banks, heads, optimiser and RNG states as they were.
- ``read_checkpoint``: a checkpoint file, memory-mapped, or one clear error (missing, a folder, not a
  checkpoint).
- ``resolve_ckpt_path``: ``ckpt_path=last`` is the newest checkpoint of the run directory (a
  pre-empted job is relaunched with the same command), a directory is its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mcl_lightning.core.errors import UserError, one_line

from mcl_lightning.core.errors import ConfigError

LAST = "last.ckpt"
_TMP_SUFFIX = ".tmp"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``.<name>.<random>.tmp`` in the target's folder, fsync, then ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transaction-based writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        atomic_save(checkpoint, Path(path))


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that readers only ever see the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for a plain open
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every filesystem)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder``; returns what was removed."""
    removed = []
    for tmp in folder.glob(f".*.ckpt.*{_TMP_SUFFIX}") if folder.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


class Preempted(SIGTERMException):
    """Training stopped on SIGTERM after saving ``checkpoint``."""

    def __init__(self, checkpoint: Path | None, epoch: int, step: int) -> None:
        super().__init__(143)
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


def check_every_n_steps(every_n_steps: Any, key: str = "checkpoint.every_n_steps") -> None:
    """``every_n_steps`` of ``LastCheckpoint``: an integer >= 0 (the config's early checks and the callback)."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
        raise ConfigError(f"{key} must be an integer >= 0 (0: epoch ends only), got {every_n_steps!r}")


class LastCheckpoint(Checkpoint):
    """``<dirpath>/last.ckpt`` at every epoch end, every ``every_n_steps`` optimizer steps (0: never)
    and on SIGTERM. A ``Checkpoint`` callback: Lightning runs it after the others (the non-finite
    guard first); list it after ``ModelCheckpoint`` so that its state includes the epoch's best.

    On one process SIGTERM only sets a flag: the step in progress finishes, the checkpoint is
    written, and ``Preempted`` stops the run. At an epoch's last step (and during validation) the
    epoch finishes first and the run stops after its checkpoint; in the last epoch the run finishes.
    Under DDP Lightning's own handler stops every rank at the same batch (it broadcasts the signal
    each step) and the checkpoint is written then.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 0) -> None:
        check_every_n_steps(every_n_steps)
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps
        self.sigterm = False
        self.saved_on_sigterm = False
        self._last_saved_step = -1
        self._previous_handler: Any = None

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        later = trainer.callbacks[trainer.callbacks.index(self) + 1:] if self in trainer.callbacks else []
        if stage == "fit" and any(isinstance(c, ModelCheckpoint) for c in later):
            rank_zero_warn(f"{type(self).__name__} is listed before a ModelCheckpoint: {LAST} will not hold the "
                           "best score or path; list it after the ModelCheckpoint (BestCheckpoint)")

    # -- SIGTERM ------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sigterm = self.saved_on_sigterm = False
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            # Replaces Lightning's handler (which would abort a validation half-way) for this fit.
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.sigterm = True

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handler()

    # -- saving -------------------------------------------------------------------------------
    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last_saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's own checkpoint follows its validation (restarting from a checkpoint written
            # here, Lightning would skip that validation); on SIGTERM the run stops after it.
            return
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0  # no half-accumulated gradients
        if self.sigterm and stepped:
            self.save(trainer)
            self.saved_on_sigterm = True
            raise Preempted(self.path, trainer.current_epoch, trainer.global_step)
        step = trainer.global_step
        if self.every_n_steps and stepped and step % self.every_n_steps == 0 and step != self._last_saved_step:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.save(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.sigterm:  # came during the last step or the validation: the epoch-end checkpoint is the one
            self.saved_on_sigterm = True
            raise Preempted(self.path, trainer.current_epoch - 1, trainer.global_step)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # DDP: Lightning raised SIGTERMException on every rank at the start of the same batch.
        if (isinstance(exception, SIGTERMException) and not isinstance(exception, Preempted)
                and trainer.training and not trainer.sanity_checking):
            self.save(trainer)
            self.saved_on_sigterm = True
        self._restore_handler()


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` of a validation metric that, in a run stopped before its first validation
    (``trainer.max_steps``, ``max_time``), says once that there is no best checkpoint yet and that
    ``last.ckpt`` is the one kept, instead of Lightning's warning about a metric never logged."""

    _noted = False

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if (self.monitor is not None and self.monitor not in monitor_candidates
                and not trainer.fit_loop.epoch_loop.val_loop._has_run):
            if not self._noted:
                rank_zero_info(f"no validation has run yet, so no best checkpoint ({self.monitor}); "
                               f"{LAST} is the checkpoint kept")
                self._noted = True
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)


# -- finding checkpoints ------------------------------------------------------------------------
def newest_checkpoint(folder: Path) -> Path | None:
    """``last.ckpt`` of ``folder`` (or of ``folder/checkpoints``), else its newest ``*.ckpt``."""
    for candidate in (folder / "checkpoints", folder):
        if (candidate / LAST).is_file():
            return candidate / LAST
        found = [p for p in candidate.glob("*.ckpt") if p.is_file()] if candidate.is_dir() else []
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    return None


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start fresh.

    ``last``: the newest checkpoint of ``run_dir`` (None if it has none yet: a first launch);
    a directory: its newest checkpoint (an error if it has none); a file: itself.
    """
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        return newest_checkpoint(run_dir)
    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir():
        found = newest_checkpoint(path)
        if found is None:
            raise ConfigError(f"ckpt_path={ckpt_path} is a folder without checkpoints (*.ckpt); pass a run "
                              "directory that has checkpoints/, a .ckpt file, or ckpt_path=last")
        return found
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist; pass a checkpoint such as "
                          "<run dir>/checkpoints/last.ckpt, a run directory, or ckpt_path=last")
    return path


def read_checkpoint(path: str | Path, option: str = "") -> dict[str, Any]:
    """The checkpoint at ``path``, memory-mapped (cheap even with large banks), tensors and plain values
    only; a ``UserError`` naming the fix when it is missing, a folder or not a checkpoint. ``option``
    names where the path came from (``"ckpt_path="``) in the message."""
    path = Path(path)
    named = f"{option}{path}"
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
        hint = f"e.g. {last}" if last.is_file() else "e.g. <run dir>/checkpoints/last.ckpt"
        raise UserError(f"{named} is a folder; pass a checkpoint file, {hint}")
    if not path.is_file():
        raise UserError(f"{named} does not exist; pass a checkpoint such as <run dir>/checkpoints/last.ckpt")
    if not zipfile.is_zipfile(path):  # torch.save's format; a truncated checkpoint loses its zip directory too
        raise UserError(f"{named} is not a checkpoint (not a file torch.save wrote, or cut short); "
                        "pass a checkpoint such as <run dir>/checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # damaged inside, or pickled objects that are not plain values
        raise UserError(f"{named} cannot be read as a checkpoint ({one_line(error)}); "
                        "pass a checkpoint such as <run dir>/checkpoints/last.ckpt") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        held = ("a network's weights (a state_dict, as export writes)"
                if isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
                else f"a {type(checkpoint).__name__} without a state_dict")
        raise UserError(f"{named} holds {held}, not a training checkpoint; pass one such as "
                        "<run dir>/checkpoints/last.ckpt")
    return checkpoint


# -- what a checkpoint was trained with ---------------------------------------------------------
def state_differences(saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> list[str]:
    """Tensors whose shapes differ (bank size, head widths, ...) and keys only one side has."""
    diffs = []
    for key in sorted(set(saved) & set(current)):
        if tuple(saved[key].shape) != tuple(current[key].shape) and current[key].numel() > 0:
            what = "bank size" if key.endswith("memory_bank.memory") else key
            diffs.append(f"{what}: checkpoint {tuple(saved[key].shape)}, now {tuple(current[key].shape)}")
    for label, keys in (("only in the checkpoint", set(saved) - set(current)),
                        ("missing from the checkpoint", set(current) - set(saved))):
        if keys:
            shown = sorted(keys)
            diffs.append(f"{label}: {', '.join(shown[:4])}{' ...' if len(shown) > 4 else ''}")
    return diffs


def incompatible(path: Path | None, diffs: list[str]) -> ConfigError:
    """One message for a checkpoint that does not match the run (before the data: train's config check;
    after: ``OKDSystem.on_load_checkpoint``'s weights check)."""
    which = f"ckpt_path={path}" if path is not None else "the checkpoint"
    return ConfigError(f"{which} was trained with a different configuration: {'; '.join(diffs)}. "
                       "Resume with the checkpoint's settings, or start a new run without ckpt_path")
