"""Mutual Contrastive Learning (Yang, An, Cai, Xu, AAAI 2022), winycg/MCL@236da2f: the CIFAR
in-batch loss (``main_cifar.py``, ``losses/cifar_sup_mcl_loss.py``; ``contrast="batch"``, below) and
the ImageNet memory-bank loss (``contrast="bank"``, ``mcl_lightning.methods.mutual_cl_bank``).

``contrast="batch"``: every network has its own projection MLP, z_i = normalise(W2 relu(W1 h_i)) in R^128, and
s^{ij} = z_i z_j^T / tau is the (B, B) similarity of network i's anchors to network j's embeddings of
the same batch. With P(b) = {c != b : y_c = y_b} (same class, the anchor itself excluded) and the
denominator over every c != b (the same-instance column excluded, also across networks):

    SupCon(s) = mean over anchors b with P(b) non-empty of
                -1/|P(b)| sum_{p in P(b)} [ s_bp - log sum_{c != b} exp(s_bc) ]

    L = sum_i CE(f_i, y)                                          ce
      + alpha  * sum_i SupCon(s^{ii})                             vcl       (within each network)
      + gamma  * sum_{i != j} T^2 KL(softmax(s^{jj}/T), det. || softmax(s^{ii}/T))   soft_vcl
      + beta   * sum_{i != j} SupCon(s^{ij})                      icl       (across each ordered pair)
      + lam    * sum_{i != j} T^2 KL(softmax(s^{ji}/T), det. || softmax(s^{ij}/T))   soft_icl
      [ + sum_k T^2 KL(softmax(mean_i f_i / T) || softmax(f_k / T)) ]                 logit_kd

logit_kd (``logit_distill``): students k in {0, 1} if N = 2 else {N-1} (``logit_kd_students=pair_or_last``,
main_cifar.py:165-169) or k = N-1 for every N (``last``, main_imagenet.py:153); the teacher is detached
(``logit_kd_detach_teacher``, main_cifar.py:162) or, as main_imagenet.py:145-150, passes the KL's gradient
into every network through the mean.

KL rows are whole rows of s (the reference does not mask them), batch mean; T = kd_temperature.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mcl_lightning.contrast import float32_region
from mcl_lightning.methods.base import OKDMethod, register_method
from mcl_lightning.methods.losses import cross_entropy_per_peer, distill_kl, row_kl
from mcl_lightning.methods.mutual_cl_bank import BankContrast, check_bank_options
from mcl_lightning.models.contract import PeerLayout, PeerOutput, PeerSpec
from mcl_lightning.core.registry import check_choice
from mcl_lightning.methods.options import check_flags, check_kd_options, check_positive, check_projection_dim

CONTRAST_MODES = ("batch", "bank")
LOGIT_KD_STUDENTS = ("pair_or_last", "last")  # main_cifar.py:165-169, main_imagenet.py:153


class ProjectionMLP(nn.Module):
    """``Linear(C, D)`` -> ReLU -> ``Linear(D, D)`` -> L2 normalisation (the reference's ``Embed``)."""

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True), nn.Linear(out_dim, out_dim))

    def forward(self, features: Tensor) -> Tensor:
        z = self.net(features.flatten(1))
        return z / z.pow(2).sum(1, keepdim=True).sqrt()  # no epsilon, as the reference's Normalize


def supervised_contrastive(similarity: Tensor, labels: Tensor) -> Tensor:
    """SupCon loss of each (B, B) similarity matrix in ``similarity`` (..., B, B) -> (...).

    Positives of anchor b: the other samples of its class; denominator: every column but b itself.
    Anchors without a positive are left out of the mean (the reference divides 0 by 0 there); a
    matrix with no such anchor at all gives 0. No host synchronisation.
    """
    b = labels.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=labels.device)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    # log sum_{c != b} exp(s_bc): a finite fill instead of -inf keeps a 1-sample batch free of NaN
    log_denominator = similarity.masked_fill(eye, torch.finfo(similarity.dtype).min).logsumexp(-1, keepdim=True)
    log_prob = similarity - log_denominator
    count = positives.sum(1)
    mean_log_prob_pos = (log_prob * positives).sum(-1) / count.clamp(min=1)
    has_positive = count > 0
    return -(mean_log_prob_pos * has_positive).sum(-1) / has_positive.sum().clamp(min=1)


@register_method("mutual_cl")
class MutualCL(OKDMethod):
    """Mutual contrastive learning: supervised contrast within (VCL) and across (ICL) the networks,
    in-batch or against memory banks, and mutual KL between their contrastive distributions (soft
    VCL / soft ICL).

    With ``contrast="batch"``, train it with class-balanced batches (``data.samples_per_class=2``, as
    the reference's CIFAR script): with plain shuffling many anchors have no same-class partner in the
    batch and drop out of VCL / ICL. Peers may be different backbones (each has its own projection
    MLP from its own width).

    Args:
        projection_dim: output width of the projection MLPs (reference feat_dim: 128).
        tau: temperature of the contrastive distributions (winycg/MCL@236da2f: 0.1 in
            ``main_cifar.py:49`` since e81472e, 0.07 in ``main_imagenet.py:58``).
        kd_temperature: T of soft VCL / soft ICL and of the logit distillation (reference kd_T: 3).
        alpha, gamma, beta, lam: weights of VCL, soft VCL, ICL and soft ICL (reference scripts:
            0.1, 1, 0.1, 1).
        logit_distill: add the reference's ``--logit-distill`` term (weight 1, T = kd_temperature,
            teacher = mean of all peers' logits).
        logit_kd_students: which peers ``logit_kd`` distils: ``pair_or_last`` (both when N = 2, else
            the last: ``main_cifar.py:165-169``) or ``last`` (the last for every N: ``main_imagenet.py:153``).
        logit_kd_detach_teacher: detach the teacher (``main_cifar.py:162``); false lets the KL's gradient
            reach every peer through the mean, as ``main_imagenet.py:145-153``.
        layout_peers: the N the entry point builds the peers for (the config passes ``${peers}``).
            The reference trains N = 2 as two independent networks and other N as branches of one
            network sharing stem and first stage; ``reference_layout`` follows it (``None``: shared).
        contrast: ``batch`` (the CIFAR loss: the batch's own embeddings) or ``bank`` (the ImageNet
            loss: per-network memory banks scored at [instance, pos_k same-class, neg_k others]).
        pos_k, neg_k, bank_momentum: the bank variant's same-class and other-class samples per
            anchor and bank momentum (reference: 1, 8192, 0.5); unused with ``contrast=batch``.
    """

    min_peers = 2
    ensemble_description = "mean of the peers' logits (the reference sums them: the same prediction)"

    def __init__(
        self,
        projection_dim: int = 128,
        tau: float = 0.1,
        kd_temperature: float = 3.0,
        alpha: float = 0.1,
        gamma: float = 1.0,
        beta: float = 0.1,
        lam: float = 1.0,
        logit_distill: bool = False,
        logit_kd_students: str = "pair_or_last",
        logit_kd_detach_teacher: bool = True,
        layout_peers: int | Sequence[str] | None = None,
        contrast: str = "batch",
        pos_k: int = 1,
        neg_k: int = 8192,
        bank_momentum: float = 0.5,
    ) -> None:
        super().__init__()
        check_choice("method.contrast", contrast, CONTRAST_MODES)
        check_choice("method.logit_kd_students", logit_kd_students, LOGIT_KD_STUDENTS)
        check_flags(logit_distill=logit_distill, logit_kd_detach_teacher=logit_kd_detach_teacher)
        check_bank_options(pos_k, neg_k, bank_momentum)
        check_positive(tau=tau)
        check_kd_options(kd_temperature, alpha=alpha, gamma=gamma, beta=beta, lam=lam)
        check_projection_dim(projection_dim)
        self.projection_dim, self.tau, self.kd_temperature = projection_dim, tau, kd_temperature
        self.alpha, self.gamma, self.beta, self.lam = alpha, gamma, beta, lam
        self.logit_distill, self.logit_kd_students = logit_distill, logit_kd_students
        self.logit_kd_detach_teacher = logit_kd_detach_teacher
        if layout_peers is not None and not isinstance(layout_peers, int):
            layout_peers = len(list(layout_peers))  # backbone names: one peer per name
        self.layout_peers = layout_peers
        self.contrast, self.pos_k, self.neg_k, self.bank_momentum = contrast, pos_k, neg_k, bank_momentum
        self.needs_train_labels = contrast == "bank"  # one bank row per training sample, class-aware draws
        self.needs_indices = contrast == "bank"

    @property
    def reference_layout(self) -> PeerLayout:  # winycg/MCL models: *_n for N = 2, *_b otherwise
        return PeerLayout(topology="independent") if self.layout_peers == 2 else PeerLayout()

    def build(self, spec: PeerSpec) -> None:
        self.heads = nn.ModuleList(ProjectionMLP(c, self.projection_dim) for c in spec.feature_dims)
        if self.contrast == "bank":
            self.bank = BankContrast(spec.num_peers, self.projection_dim, self.pos_k, self.neg_k,
                                     self.bank_momentum, self.tau, self.kd_temperature)

    def setup_data(self, train_labels: Tensor) -> None:
        if self.contrast == "bank":
            self.bank.setup_data(train_labels)

    def embed(self, features: Sequence[Tensor]) -> Tensor:
        """(N, B, D) normalised embeddings, one projection MLP per network."""
        return torch.stack([head(f.float()) for head, f in zip(self.heads, features)])

    def contrastive_terms(self, features: Sequence[Tensor], labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        """Unweighted VCL, soft VCL, ICL and soft ICL, each summed over networks / ordered pairs
        (``contrast=bank``: against the memory banks, which are then updated)."""
        with float32_region(labels.device):
            z = self.embed(features)
            if self.contrast == "bank":
                return self.bank(z, labels, indices)
            n = z.shape[0]
            # s[i, j] = z_i z_j^T / tau: every (anchor network, contrast network) pair in one product
            s = torch.einsum("ibd,jcd->ijbc", z, z) / self.tau  # (N, N, B, B)
            off = 1.0 - torch.eye(n, dtype=z.dtype, device=z.device)  # a mask by product: no host sync
            supcon = supervised_contrastive(s, labels)  # (N, N)
            intra = s.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # (N, B, B): s[i, i]
            # soft VCL: student s[i, i], teacher s[j, j]; soft ICL: student s[i, j], teacher s[j, i]
            soft_vcl = row_kl(intra[:, None], intra[None, :].detach(), self.kd_temperature)  # [i, j]
            soft_icl = row_kl(s, s.transpose(0, 1).detach(), self.kd_temperature)
            return {
                "vcl": supcon.diagonal().sum(),
                "soft_vcl": (soft_vcl * off).sum(),
                "icl": (supcon * off).sum(),
                "soft_icl": (soft_icl * off).sum(),
            }

    def logit_kd(self, logits: Tensor) -> Tensor:
        """T^2 KL from the mean of the peers' logits into the students (``logit_kd_students``); the
        mean is detached unless ``logit_kd_detach_teacher`` is false."""
        teacher = logits.mean(0)
        if self.logit_kd_detach_teacher:
            teacher = teacher.detach()
        both = self.logit_kd_students == "pair_or_last" and logits.shape[0] == 2
        students = logits if both else logits[-1]
        with float32_region(logits.device):
            return distill_kl(students, teacher, self.kd_temperature)

    def forward(self, output: PeerOutput, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        terms = self.contrastive_terms(output.features, labels, indices)
        losses = {
            "ce": cross_entropy_per_peer(output.logits, labels).sum(),
            "vcl": self.alpha * terms["vcl"],
            "soft_vcl": self.gamma * terms["soft_vcl"],
            "icl": self.beta * terms["icl"],
            "soft_icl": self.lam * terms["soft_icl"],
        }
        if self.logit_distill:
            losses["logit_kd"] = self.logit_kd(output.logits)
        return losses
