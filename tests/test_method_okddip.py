"""OKDDip (method=okddip) against float64 computations written from its formulas, its layout, bf16, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_module

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import OKDDip
from mcl_lightning.models import PeerNetwork, PeerOutput, PeerSpec, count_parameters
from mcl_lightning.train import build_network

from conftest import fp32_and_bf16_losses
from reference64 import cross_entropy64, kl64

WIDTH = 16


def attached_okddip(num_peers: int, **options) -> OKDDip:
    method = OKDDip(**options)
    method.attach(PeerSpec(num_peers, (WIDTH,) * num_peers, 10, "shared_trunk", trunk_channels=8))
    return method


def reference_okddip(features, logits, labels, w_q, w_k, t, detach=False):
    """main_cifar_okddip.py / okddip_resnet.py written out one auxiliary peer at a time.

    Returns (sum of all N CEs, sum over auxiliary peers of KL(attention target || peer), KL(peer mean || leader)).
    """
    n = logits.shape[0]
    m = n - 1  # auxiliary peers 0 ... N-2; the leader is peer N-1
    ce = sum(cross_entropy64(logits[i], labels) for i in range(n))
    peer_kd = 0.0
    for i in range(m):
        query = features[i] @ w_q.T  # (B, d)
        energy = torch.stack([(query * (features[j] @ w_k.T)).sum(1) for j in range(m)], dim=1)  # (B, M)
        weights = energy.exp() / energy.exp().sum(1, keepdim=True)  # softmax over the auxiliary peers
        target = sum(weights[:, j:j + 1] * logits[j] for j in range(m))
        peer_kd = peer_kd + kl64(target.detach() if detach else target, logits[i], t)
    mean = sum(logits[j] for j in range(m)) / m
    leader_kd = kl64(mean.detach() if detach else mean, logits[n - 1], t)
    return ce, peer_kd, leader_kd


@pytest.mark.parametrize("num_peers", [2, 4])
@pytest.mark.parametrize("detach", [False, True])
def test_loss_terms_and_gradients_match_float64_formula(num_peers, detach):
    torch.manual_seed(num_peers)
    method = attached_okddip(num_peers, kd_weight=0.8, ce_weight=1.1, detach_targets=detach)
    for projection in (method.query, method.key):  # weights large enough for a non-uniform attention
        torch.nn.init.normal_(projection.weight, std=0.6)
    epoch = 30
    method.set_epoch(epoch, 300)
    batch, classes = 8, 10
    features = torch.randn(num_peers, batch, WIDTH).requires_grad_(True)
    logits = (torch.randn(num_peers, batch, classes) * 3).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,))
    w_q = method.query.weight.detach().double().requires_grad_(True)
    w_k = method.key.weight.detach().double().requires_grad_(True)

    terms = method(PeerOutput(logits, features), labels, torch.arange(batch))
    assert set(terms) == {"ce", "peer_kd", "leader_kd"}
    sum(terms.values()).backward()

    features64 = features.detach().double().requires_grad_(True)
    logits64 = logits.detach().double().requires_grad_(True)
    ce, peer_kd, leader_kd = reference_okddip(features64, logits64, labels, w_q, w_k, 3.0, detach)
    ramp = math.exp(-5 * (1 - epoch / 80) ** 2)
    expected = {"ce": 1.1 * ce, "peer_kd": 0.8 * ramp * peer_kd, "leader_kd": 0.8 * ramp * leader_kd}
    sum(expected.values()).backward()
    for name, value in expected.items():
        torch.testing.assert_close(terms[name].double(), torch.as_tensor(value, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-4, atol=1e-6)
    if detach:  # stopped at the targets: the features and projections get no gradient at all
        assert features.grad is None and method.query.weight.grad is None and method.key.weight.grad is None
        return
    torch.testing.assert_close(features.grad.double(), features64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(method.query.weight.grad.double(), w_q.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(method.key.weight.grad.double(), w_k.grad, rtol=1e-4, atol=1e-6)
    if num_peers == 2:  # one auxiliary peer: its target is itself, the attention is 1
        assert terms["peer_kd"].abs() < 1e-6 and features.grad.abs().sum() == 0
        return
    assert features.grad[-1].abs().sum() == 0  # the leader's features are not attended to
    assert features.grad[:-1].abs().sum() > 0 and method.query.weight.grad.abs().sum() > 0


def test_attention_spans_the_auxiliary_peers_only():
    torch.manual_seed(0)
    method = attached_okddip(4)
    features = torch.randn(4, 5, WIDTH)
    weights = method.attention(features[:-1])
    assert weights.shape == (5, 3, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, 3))
    logits = torch.randn(4, 5, 10)
    peer_targets, leader_target = method.targets(PeerOutput(logits, features))
    assert peer_targets.shape == (3, 5, 10)
    torch.testing.assert_close(leader_target, logits[:3].mean(0))
    # changing the leader's logits or features changes no auxiliary target
    moved = logits.clone()
    moved[3] += 5.0
    features[3] += 5.0
    torch.testing.assert_close(method.targets(PeerOutput(moved, features))[0], peer_targets)


def test_consistency_ramp_over_80_epochs():
    method = attached_okddip(3)
    assert method.rampup_epochs == 80
    for epoch in (0, 1, 20, 60, 79):
        method.set_epoch(epoch, 300)
        assert method.consistency_weight() == pytest.approx(math.exp(-5 * (1 - epoch / 80) ** 2), rel=1e-12)
    method.set_epoch(0, 300)
    assert method.consistency_weight() == pytest.approx(0.006737947, rel=1e-6)
    for epoch in (80, 299):
        method.set_epoch(epoch, 300)
        assert method.consistency_weight() == 1.0
    assert attached_okddip(3, rampup_epochs=0).consistency_weight() == 1.0


def test_ensemble_is_the_sum_of_all_peers_logits():
    method = attached_okddip(3)
    logits = torch.randn(3, 5, 10)
    torch.testing.assert_close(method.ensemble(PeerOutput(logits, torch.randn(3, 5, WIDTH))),
                               logits[0] + logits[1] + logits[2])
    assert OKDDip.ensemble_description.startswith("sum of all N")


@pytest.mark.parametrize("option, value", [("kd_temperature", 0.0), ("ce_weight", -1.0), ("kd_weight", -0.5),
                                           ("rampup_epochs", -1), ("attention_factor", 0),
                                           ("attention_factor", 2.5)])
def test_invalid_options_are_config_errors(option, value):
    with pytest.raises(ConfigError, match=f"method.{option}"):
        OKDDip(**{option: value})


def test_projection_width_must_be_positive():
    with pytest.raises(ConfigError, match="attention_factor=32 leaves no projection width"):
        attached_okddip(2, attention_factor=32)
    assert attached_okddip(2, attention_factor=4).query.out_features == WIDTH // 4


def _compose(overrides):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def test_reference_layout_and_parameter_count_of_okddip_resnet32():
    """Stem + layer1 + layer2 shared, layer3 + classifier per peer, query/key Linear(64, 8, bias=False):
    winycg/MCL-OKD okddip_resnet32(number_net=4) has 112,592 + 4 x 360,164 + 2 x 512 = 1,554,272 parameters."""
    peers, method = build_network(_compose(["method=okddip", "backbone=resnet32", "peers=4"]))
    assert len(peers.trunk) == 3 and peers.trunk_channels == 32
    assert count_parameters(peers.trunk) == 112_592
    assert (method.query.in_features, method.query.out_features, method.query.bias) == (64, 8, None)
    assert count_parameters(peers) + count_parameters(method) == 1_554_272
    assert count_parameters(peers.export_peer(3)) == 472_756  # the leader deployed is a plain ResNet-32


def test_loss_under_bf16_autocast_matches_float32():
    torch.manual_seed(0)
    peers = PeerNetwork.from_backbone("resnet20", num_peers=4, num_classes=10, layout=OKDDip.reference_layout)
    method = OKDDip()
    method.attach(peers.spec())
    method.set_epoch(80, 300)  # full weight on the distillation terms

    def check(output):
        assert output.features.dtype == torch.bfloat16
        assert method.attention(output.features[:-1]).dtype == torch.float32

    fp32, bf16 = fp32_and_bf16_losses(peers, method, check)
    assert abs(bf16["ce"] - fp32["ce"]) / fp32["ce"] < 1e-2
