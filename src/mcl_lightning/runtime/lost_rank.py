"""A DDP job that lost a process: recognise it on a surviving rank and say so in one line.

What a survivor sees (gloo, measured on CPU): a rank that dies closes its connections, and the
survivor's next collective fails at once with "Connection closed by peer [addr]:port" or "Connection
reset by peer"; a rank that hangs (or whose machine vanishes without closing anything) makes the
collective fail after the process group's timeout ("Timed out waiting 20000ms for recv ..."). The
message names the peer's address, not its rank: with 2 ranks the lost one is the other; with more,
the launcher's report (torchrun's failure table, Lightning's child-process log) names it.
"""

from __future__ import annotations

import re
from typing import Any

import torch.distributed as dist

# lower-case fragments of the errors gloo and NCCL raise when a peer is gone or silent
_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
         "remote process exited", "communicator was aborted")
_SILENT = ("timed out waiting", "watchdog caught collective operation timeout", "operation timed out")
_BACKEND = ("gloo", "nccl", "processgroup", "c10d")
_PEER = re.compile(r"\[([0-9A-Za-z.:_-]+)\]:(\d+)")


class LostRankError(RuntimeError):
    """This rank's collective failed because another rank died or stopped answering.

    ``failure``: what results.json records (kind, the lost rank if known, this rank, epoch, step).
    """

    def __init__(self, message: str, failure: dict[str, Any]) -> None:
        super().__init__(message)
        self.failure = failure


def _collective_error_text(error: BaseException | None) -> str | None:
    """The text of the distributed-backend error in ``error``'s chain, if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        lowered = text.lower()
        if isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(b in lowered for b in _BACKEND)):
            if any(f in lowered for f in _GONE + _SILENT):
                return text
        error = error.__cause__ or error.__context__
    return None


def _backend_sentence(text: str) -> str:
    """gloo's / NCCL's own sentence without its source path and advice: "Connection closed by peer [..]:1"."""
    sentence = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
    return sentence.split(". ")[0].strip().rstrip(".")


def lost_rank_error(error: BaseException, rank: int, world_size: int, timeout_s: float | None,
                    epoch: int, step: int) -> LostRankError | None:
    """A ``LostRankError`` describing ``error`` if it is a collective that lost its peer, else None."""
    text = _collective_error_text(error)
    if text is None:
        return None
    silent = not any(f in text.lower() for f in _GONE)
    lost = 1 - rank if world_size == 2 else None
    peer = _PEER.search(text)
    address = f"{peer.group(1)}:{peer.group(2)}" if peer else None
    if lost is not None:
        who = f"rank {lost}"
    elif address:
        who = f"the rank at {address} (the launcher's log names it)"
    else:
        who = "another rank (the launcher's log names it)"
    if silent:
        limit = f"trainer.strategy.timeout_s={timeout_s:g}" if timeout_s else "the process group's timeout"
        what = f"{who} did not answer within {limit} s"
    else:
        what = f"lost {who}"
    message = (f"DDP rank {rank} of {world_size}: {what} at epoch {epoch}, step {step} ({_backend_sentence(text)}); "
               "this rank stops too. Relaunch the same command with ckpt_path=last to resume from the newest "
               "checkpoint (under torchrun, --max-restarts N does that)")
    failure = {"error": "rank_timeout" if silent else "lost_rank", "lost_rank": lost, "peer": address, "rank": rank,
               "world_size": world_size, "epoch": epoch, "step": step}
    return LostRankError(message, failure)
