"""The DDP strategy of ``trainer=ddp`` / ``trainer=ddp_cpu``: a bounded wait for a lost rank, and a
process group that torchrun can restart.

- ``timeout_s`` is the process group's timeout: a rank that stops answering (hung, or its machine
  gone without closing its connections) makes the others' collectives fail after this many seconds
  instead of PyTorch's 30 minutes. A rank that dies on a reachable machine closes its connections,
  and the others fail at their next collective (``mcl_lightning.runtime.lost_rank`` names it).
- Under torchrun (``--max-restarts N``) the agent keeps one rendezvous store for every restart of
  the worker group, and the process group's keys (gloo's addresses, NCCL's ids) are not scoped to
  the restart: a restarted group would read the dead group's addresses and fail to connect. Here
  the group's keys live under ``mcl_lightning/attempt_<TORCHELASTIC_RESTART_COUNT>``.
- Without torchrun, Lightning's launcher runs rank 0 and starts the other ranks; its observer thread
  kills rank 0 as soon as it sees another rank exit. Here rank 0 gets ``MAIN_GRACE_S`` first, to stop
  by itself with its one line and a ``status: failed`` results.json (it normally needs about a step).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from mcl_lightning.core.errors import ConfigError

DEFAULT_TIMEOUT_S = 300.0
MAIN_GRACE_S = 20.0


def check_timeout_s(timeout_s: Any) -> None:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ConfigError(f"trainer.strategy.timeout_s must be a number of seconds > 0, got {timeout_s!r} "
                          f"(e.g. trainer.strategy.timeout_s={DEFAULT_TIMEOUT_S:.0f})")


class RestartableDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with its timeout in seconds and a restart-scoped store under torchrun."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> None:
        check_timeout_s(timeout_s)
        if "timeout" in kwargs:
            raise ConfigError("set the DDP timeout with trainer.strategy.timeout_s=<seconds>, not timeout=")
        super().__init__(timeout=timedelta(seconds=timeout_s), **kwargs)
        self.timeout_s = float(timeout_s)

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _PatientLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def setup_distributed(self) -> None:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and not dist.is_initialized():
            self.set_world_ranks()
            self._init_process_group_for_attempt(attempt)
        super().setup_distributed()  # Lightning's own set-up; it keeps a group that is already there

    def _init_process_group_for_attempt(self, attempt: str) -> None:
        timeout = timedelta(seconds=self.timeout_s)
        store, rank, world_size = next(dist.rendezvous("env://", self.global_rank, self.world_size, timeout=timeout))
        store.set_timeout(timeout)
        device = self.root_device
        # the line Lightning logs when it sets up the group itself (launch logs and tests look for it)
        logging.getLogger("lightning.fabric.utilities.distributed").info(
            f"Initializing distributed: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/{world_size}")
        scoped = dist.PrefixStore(f"mcl_lightning/attempt_{attempt}", store)
        dist.init_process_group(self._get_process_group_backend(), store=scoped, rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device if device.type != "cpu" else None)


class _PatientObserver(_ChildProcessObserver):
    """Lightning's watcher of the child ranks; it kills the main process (rank 0) ``MAIN_GRACE_S`` late."""

    def _terminate_all(self) -> None:
        for child in self._child_processes:
            child.send_signal(self._termination_signal)
        time.sleep(MAIN_GRACE_S)  # rank 0 normally exits by itself meanwhile (this thread ends with it)
        os.kill(self._main_pid, self._termination_signal)


class _PatientLauncher(_SubprocessScriptLauncher):
    """Lightning's ``_SubprocessScriptLauncher.launch`` with ``_PatientObserver`` as the observer."""

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _PatientObserver(main_pid=os.getpid(), child_processes=self.procs).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)
