"""Launched by test_ddp_failures.py through torchrun: the training CLI (``mcl_lightning.train``) whose
``torch.save`` writes each checkpoint in 16 pieces 0.25 s apart, so that a test can kill the writer
while a checkpoint is half written. The maths is the CLI's own.

    torchrun --nproc-per-node 2 tests/ddp_slow_writer.py trainer=ddp_cpu ... checkpoint.every_n_steps=2
"""

from __future__ import annotations

import io
import time
from typing import Any

import torch

from mcl_lightning import train

PIECES, PAUSE_S = 16, 0.25
_save = torch.save


def slow_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
    buffer = io.BytesIO()
    _save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    size = len(data) // PIECES + 1
    for start in range(0, len(data), size):
        handle.write(data[start:start + size])
        handle.flush()
        time.sleep(PAUSE_S)


if __name__ == "__main__":
    torch.save = slow_save  # mcl_lightning.runtime.checkpointing.atomic_save calls torch.save(obj, handle)
    train.main()
