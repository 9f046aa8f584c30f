"""MCL-OKD's contrastive loss with its gradient computed in the forward pass (one autograd node).

The loss is the same as ``mcl_lightning.contrast.nce.multi_view_nce`` (CRD-style binary NCE of
every ordered pair of peers a != b, negatives summed, batch averaged, per-batch normaliser Z
detached); only the way it is computed differs:

- **Only the N(N - 1) pairs that count are scored.** Each bank is scored against the embeddings of
  the *other* peers (a tiny gather of z), not against all N and masked: at N = 4 a quarter less
  arithmetic and memory, at N = 2 half.
- **The gradient is closed-form.** With Z detached, dL/dl for a score l = m . z / tau reduces to one
  sigmoid-like factor per element, so the forward pass computes the loss and dL/dz together, in a
  handful of in-place passes over one buffer, and autograd keeps only dL/dz (N x B x D floats).
  Nothing of the (N, N - 1, B, K + 1) scores, the gathered bank rows or a bank snapshot survives
  the forward pass, so the banks can be updated in place right after it (the reference order:
  score, update, then backward) without the 102 MB bank copy the plain autograd path needs.
- **Two ways to score**, equal up to float rounding: ``gather`` reads each anchor's K + 1 rows of
  every bank (N x B x (K + 1) x D floats, the reference's way, once per bank instead of once per
  pair); ``dense`` multiplies the whole bank by the batch's embeddings (one GEMM per bank) and picks
  each anchor's K + 1 scores out, which is cheaper when B (K + 1) is several times the bank size
  (K = 16384 on CIFAR).

With x = l / tau, Z = mean(exp(x)) * N_data over the term's (B, K + 1) scores, P = exp(x) / Z,
c = K / N_data and R = (c + eps) / (P + c + eps):

    L_term = (1 / B) [ sum_{n,k} log(P + c + eps) - sum_n log P_n0 - B K log c ]
           = (1 / B) [ sum_{n,k} log(1 + P / (c + eps)) + B (K + 1) log(c + eps) - sum_n log P_n0 - B K log c ]
    dL_term / dx = (1 - R) / B    for the K negatives,     -R / B    for the positive (column 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

SCORING = ("gather", "dense")


class Workspace:
    """Reusable scratch buffers, by name. On CPU, buffers above glibc's mmap threshold (32 MB at
    most) come fresh from the kernel at every allocation, and their page faults cost as much as the
    arithmetic on them (a 154 MB score matrix: ~90 ms of faults against ~160 ms of GEMM on 2 cores).
    GPUs have a caching allocator, so there the workspace is not used (``for_device`` gives None).

    A buffer handed out is overwritten by the next request of the same name: only for values that
    do not outlive the call that requested them.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    @staticmethod
    def for_device(workspace: "Workspace | None", device: torch.device) -> "Workspace | None":
        """``workspace`` on CPU in eager mode; None on GPUs and under torch.compile (which plans
        its own buffers)."""
        if device.type != "cpu" or torch.compiler.is_compiling():
            return None
        return workspace

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.device != device or buffer.numel() < numel:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


def _scratch(workspace: "Workspace | None", name: str, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
    return None if workspace is None else workspace.get(name, shape, like.dtype, like.device)


def _other_index(num_peers: int, device: torch.device) -> Tensor:
    """Flat (N (N - 1),) index: for each a, the peers b != a in increasing order (from Python ints:
    no boolean-mask indexing, whose shape would depend on device data)."""
    flat = [b for a in range(num_peers) for b in range(num_peers) if b != a]
    return torch.tensor(flat, dtype=torch.long, device=device)


class _FusedMultiViewNCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: Tensor,
        bank: Tensor,
        contrast_idx: Tensor,
        tau: float,
        num_samples: int,
        eps: float,
        scoring: str,
        workspace: Workspace | None,
    ) -> Tensor:
        n, batch, dim = z.shape
        k1 = contrast_idx.shape[1]
        k = k1 - 1
        others = _other_index(n, z.device)
        z_others = z.index_select(0, others).view(n, n - 1, batch, dim)  # z_others[a, j] = z[b_j(a)]
        if scoring == "gather":
            # bank: (N, B, K + 1, D) rows already gathered. Scores (N_a, B, N - 1, K + 1).
            x = torch.matmul(z_others.permute(0, 2, 1, 3), bank.transpose(-1, -2),
                             out=_scratch(workspace, "x", (n, batch, n - 1, k1), z))
            term_dims: tuple[int, ...] = (1, 3)
        else:
            # bank: (N, N_data, D), the whole banks. One GEMM per bank, then each anchor's K + 1.
            rows = (n, (n - 1) * batch, bank.shape[1])
            scores = torch.bmm(z_others.reshape(n, (n - 1) * batch, dim), bank.transpose(1, 2),
                               out=_scratch(workspace, "scores", rows, z))
            scores = scores.view(n, n - 1, batch, -1)
            index = contrast_idx[None, None].expand(n, n - 1, batch, k1)
            x = torch.gather(scores, 3, index, out=_scratch(workspace, "x", (n, n - 1, batch, k1), z))
            term_dims = (2, 3)
        # Every pass below is in place on x (fresh allocations of this size cost page faults on CPU).
        x.mul_(1.0 / tau)
        noise = k / num_samples  # c = K * Pn
        terms = n * (n - 1)
        x0 = x[..., 0].clone()  # the positives' x
        x.exp_()  # e = exp(x); exp(s / tau) as the reference, in float32
        # Z = mean(e) * N_data per term (detached by construction); w = 1 / ((c + eps) Z)
        z_term = x.sum(term_dims, keepdim=True).mul_(num_samples / (batch * k1))
        sum_log_p0 = (x0 - z_term.log().squeeze(-1)).sum()  # sum of log P at the positives
        x.mul_(z_term.mul_(noise + eps).reciprocal_()).add_(1.0)  # x <- 1 + P / (c + eps)
        x.log_()  # log(P + c + eps) - log(c + eps)
        constant = terms * batch * (k1 * math.log(noise + eps) - k * math.log(noise))
        loss = (constant + x.sum() - sum_log_p0) / batch
        if ctx.needs_input_grad[0]:
            x.neg_().exp_()  # R = (c + eps) / (P + c + eps)
            # x <- dL/dx = (1 - R) / B, and -R / B at the positives; then dL/dl = dL/dx / tau.
            scale = 1.0 / (batch * tau)
            pos = x[..., 0].clone()
            x.neg_().add_(1.0).mul_(scale)
            x[..., 0] = pos.mul_(-scale)
            if scoring == "gather":
                grad_others = torch.matmul(x, bank)  # (N_a, B, N - 1, D)
                grad_others = grad_others.permute(0, 2, 1, 3)
            else:
                scores.zero_()  # reuse the (N_a, N - 1, B, N_data) buffer for the scattered gradient
                scores.scatter_add_(3, index, x)
                grad_others = torch.matmul(scores.view(n, (n - 1) * batch, -1), bank)
            grad_z = torch.zeros_like(z).index_add(0, others, grad_others.reshape(n * (n - 1), batch, dim))
            ctx.save_for_backward(grad_z)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (grad_z,) = ctx.saved_tensors
        return grad_z * grad_output, None, None, None, None, None, None, None


def fused_multi_view_nce(
    z: Tensor,
    bank: Tensor,
    contrast_idx: Tensor,
    tau: float,
    num_samples: int,
    eps: float = 1e-7,
    scoring: str = "gather",
    workspace: Workspace | None = None,
) -> Tensor:
    """The contrastive loss summed over the N(N - 1) ordered pairs, in float32; see the module doc.

    Args:
        z: (N, B, D) the peers' normalised embeddings.
        bank: ``gather``: (N, B, K + 1, D) each bank's rows at ``contrast_idx`` (``MemoryBank.gather``);
            ``dense``: (N, N_data, D) the banks themselves (read in the forward pass only, so they
            may be updated in place as soon as this returns).
        contrast_idx: (B, K + 1) bank indices, column 0 the positive.
        tau, num_samples, eps: NCE temperature, N_data, epsilon.
        scoring: ``gather`` or ``dense`` (what ``bank`` holds).
        workspace: scratch buffers reused across calls (CPU only; see ``Workspace``).
    """
    if scoring not in SCORING:
        raise ValueError(f"scoring must be one of {SCORING}, got {scoring!r}")
    if z.shape[0] < 2:
        raise ValueError("the contrastive loss needs at least two peers")
    workspace = Workspace.for_device(workspace, z.device)
    return _FusedMultiViewNCE.apply(
        z.float(), bank.detach().float(), contrast_idx, tau, num_samples, eps, scoring, workspace
    )
