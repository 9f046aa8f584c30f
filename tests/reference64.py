"""Float64 transcriptions of the distillation formulas the method tests compare against."""

from __future__ import annotations

import torch


def log_softmax64(x):
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def cross_entropy64(logits, labels):
    return -log_softmax64(logits)[torch.arange(len(labels)), labels].mean()


def kl64(teacher, student, t):
    """T^2 * batch mean of sum_k q_k (log q_k - log p_k), q = softmax(teacher/T), p = softmax(student/T)."""
    log_q, log_p = log_softmax64(teacher / t), log_softmax64(student / t)
    return t * t * (log_q.exp() * (log_q - log_p)).sum(-1).mean()
