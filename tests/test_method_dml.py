"""DML against a float64 computation written from the formula (method.md §11)."""

from __future__ import annotations

import pytest
import torch

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import DML
from mcl_lightning.models import PeerNetwork, PeerOutput
from mcl_lightning.system import OKDSystem

from conftest import attached


def reference_dml(logits: torch.Tensor, labels: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i CE_i and sum_i sum_{j != i} T^2 KL(p_j || p_i) / (N - 1), one pair at a time, float64."""
    n = logits.shape[0]
    ce = sum(torch.nn.functional.cross_entropy(logits[i], labels) for i in range(n))
    kd = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                p_j = torch.softmax(logits[j].detach() / t, -1)
                log_p_i = torch.log_softmax(logits[i] / t, -1)
                kd = kd + t * t * (p_j * (p_j.log() - log_p_i)).sum(-1).mean() / (n - 1)
    return ce, kd


@pytest.mark.parametrize("n_peers", [2, 4])
def test_dml_terms_and_gradients_equal_the_formula(n_peers):
    torch.manual_seed(0)
    logits = (3 * torch.randn(n_peers, 6, 10)).requires_grad_(True)
    labels = torch.randint(0, 10, (6,))
    method = attached(DML(kd_temperature=2.0, gamma=1.0, alpha=0.7), n_peers, 8, num_classes=10)
    losses = method(PeerOutput(logits, torch.randn(n_peers, 6, 8)), labels, torch.arange(6))
    assert set(losses) == {"ce", "mutual_kd"}
    sum(losses.values()).backward()

    l64 = logits.detach().double().requires_grad_(True)
    ce, kd = reference_dml(l64, labels, 2.0)
    (ce + 0.7 * kd).backward()
    torch.testing.assert_close(losses["ce"].double(), ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["mutual_kd"].double(), 0.7 * kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), l64.grad, rtol=1e-4, atol=1e-6)


def test_dml_teachers_are_detached():
    """The KL term alone moves each peer only through its own (student) logits."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, requires_grad=True)
    method = attached(DML(gamma=0.0), 3, 8, num_classes=5)
    method(PeerOutput(logits, torch.randn(3, 4, 8)), torch.zeros(4, dtype=torch.long), torch.arange(4))["mutual_kd"].backward()
    # With detached teachers the gradient on peer i is sum_j (p_i - p_j)/(N-1) * T; it sums to zero over classes.
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(3, 4), atol=1e-6, rtol=0)
    assert logits.grad.abs().sum() > 0


def test_dml_accepts_heterogeneous_peers_and_checks_its_options():
    peers = PeerNetwork.from_backbone(["resnet20", "wrn_16_2"], num_classes=10)
    system = OKDSystem(peers, DML())
    out = peers(torch.randn(2, 3, 32, 32))
    losses = system.method(out, torch.tensor([1, 2]), torch.arange(2))
    assert torch.isfinite(sum(losses.values()))
    with pytest.raises(ConfigError, match="kd_temperature"):
        DML(kd_temperature=0)
    with pytest.raises(ConfigError, match="peers >= 2"):
        OKDSystem(PeerNetwork.from_backbone("resnet20", num_peers=1, num_classes=10), DML())


def test_dml_under_bf16_autocast_stays_float32_and_close():
    torch.manual_seed(0)
    logits = 4 * torch.randn(4, 16, 100)
    method = attached(DML(), 4, 8)
    labels = torch.randint(0, 100, (16,))
    fp32 = method(PeerOutput(logits, torch.randn(4, 16, 8)), labels, torch.arange(16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = method(PeerOutput(logits.bfloat16(), torch.randn(4, 16, 8)), labels, torch.arange(16))
    assert bf16["mutual_kd"].dtype == torch.float32
    assert abs(bf16["mutual_kd"] - fp32["mutual_kd"]) / fp32["mutual_kd"] < 2e-2
