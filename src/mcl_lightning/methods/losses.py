"""Loss pieces shared by OKD methods."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cross_entropy_per_peer(logits: Tensor, labels: Tensor) -> Tensor:
    """(N,) cross-entropy of each peer; ``logits`` is (N, B, classes)."""
    n, b, c = logits.shape
    losses = F.cross_entropy(logits.reshape(n * b, c), labels.repeat(n), reduction="none")
    return losses.view(n, b).mean(1)


def distill_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, batch mean (the reference's DistillKL).

    The teacher is used as given: detach it before calling when it must not be trained.
    Works on (B, C) or on stacked (N, B, C) students (then the sum over the N students).
    """
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (..., B)
    return kl.mean(-1).sum() * temperature**2


def row_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))`` per matrix, batch mean over rows: (..., B, C) -> (...).

    ``teacher`` is used as given (detach it first)."""
    log_p = F.log_softmax(student / temperature, dim=-1)
    log_q = F.log_softmax(teacher / temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean(-1) * temperature**2
