"""ONE (method=one) against float64 computations written from its formulas, its layout, bf16, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_module

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import ONE
from mcl_lightning.methods.one import sigmoid_rampup
from mcl_lightning.models import PeerNetwork, PeerOutput, PeerSpec, count_parameters
from mcl_lightning.train import build_network

from conftest import fp32_and_bf16_losses
from reference64 import cross_entropy64, kl64

TRUNK_CHANNELS = 16


def attached_one(num_peers: int, **options) -> ONE:
    method = ONE(**options)
    method.attach(PeerSpec(num_peers, (8,) * num_peers, 10, "shared_trunk", trunk_channels=TRUNK_CHANNELS))
    torch.nn.init.uniform_(method.gate.norm.weight, 0.5, 2.0)  # a non-trivial BN affine
    torch.nn.init.uniform_(method.gate.norm.bias, -0.5, 0.5)
    return method


def gate64(trunk, fc_w, fc_b, bn_w, bn_b, bn_mean=None, bn_var=None, eps=1e-5):
    """softmax(ReLU(BN(Linear(avgpool(trunk))))); batch statistics unless running ones are given."""
    z = trunk.mean(dim=(2, 3)) @ fc_w.T + fc_b
    if bn_mean is None:
        bn_mean, bn_var = z.mean(0), z.var(0, unbiased=False)
    z = (z - bn_mean) / torch.sqrt(bn_var + eps) * bn_w + bn_b
    z = torch.clamp(z, min=0.0)
    return z.exp() / z.exp().sum(1, keepdim=True)


def gate_params64(method):
    return [p.detach().double().requires_grad_(True) for p in
            (method.gate.fc.weight, method.gate.fc.bias, method.gate.norm.weight, method.gate.norm.bias)]


def test_gate_is_softmax_relu_bn_linear_of_the_pooled_trunk():
    torch.manual_seed(0)
    method = attached_one(3)
    trunk = torch.randn(8, TRUNK_CHANNELS, 4, 4) * 2
    params = gate_params64(method)
    # training mode: batch statistics
    torch.testing.assert_close(method.gate(trunk).double(), gate64(trunk.double(), *params), rtol=1e-5, atol=1e-7)
    # evaluation mode: running statistics
    method.gate.norm.running_mean.uniform_(-0.5, 0.5)
    method.gate.norm.running_var.uniform_(0.5, 2.0)
    method.eval()
    expected = gate64(trunk.double(), *params, method.gate.norm.running_mean.double(),
                      method.gate.norm.running_var.double())
    got = method.gate(trunk)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(1), torch.ones(8))
    assert method.gate.fc.in_features == TRUNK_CHANNELS and method.gate.fc.out_features == 3


@pytest.mark.parametrize("num_peers", [2, 4])
@pytest.mark.parametrize("rampup_epochs, epoch", [(0, 0), (80, 20)])
def test_loss_terms_and_gradients_match_float64_formula(num_peers, rampup_epochs, epoch):
    torch.manual_seed(num_peers)
    method = attached_one(num_peers, rampup_epochs=rampup_epochs, ce_weight=0.7, ensemble_ce_weight=1.3,
                          kd_weight=0.9)
    method.set_epoch(epoch, 300)
    batch, classes = 8, 10
    trunk = (torch.randn(batch, TRUNK_CHANNELS, 4, 4) * 2).requires_grad_(True)
    logits = (torch.randn(num_peers, batch, classes) * 3).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,))
    params64 = gate_params64(method)

    terms = method(PeerOutput(logits, torch.randn(num_peers, batch, 8), trunk), labels, torch.arange(batch))
    assert set(terms) == {"ce", "ensemble_ce", "kd"}
    sum(terms.values()).backward()

    trunk64 = trunk.detach().double().requires_grad_(True)
    logits64 = logits.detach().double().requires_grad_(True)
    g = gate64(trunk64, *params64)
    teacher = sum(g[:, i:i + 1] * logits64[i] for i in range(num_peers))
    ramp = 1.0 if rampup_epochs == 0 else math.exp(-5 * (1 - epoch / rampup_epochs) ** 2)
    expected = {
        "ce": 0.7 * sum(cross_entropy64(logits64[i], labels) for i in range(num_peers)),
        "ensemble_ce": 1.3 * cross_entropy64(teacher, labels),
        "kd": 0.9 * ramp * sum(kl64(teacher.detach(), logits64[i], 3.0) for i in range(num_peers)),
    }
    sum(expected.values()).backward()
    for name, value in expected.items():
        torch.testing.assert_close(terms[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(trunk.grad.double(), trunk64.grad, rtol=1e-4, atol=1e-7)
    for ours, theirs in zip((method.gate.fc.weight, method.gate.fc.bias, method.gate.norm.weight,
                             method.gate.norm.bias), params64):
        # (the Linear's bias gradient is 0 in exact arithmetic: BN removes any shift before it)
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)
    assert trunk.grad.abs().sum() > 0  # the gate trains the trunk through the ensemble's CE


def test_consistency_ramp_follows_the_formula():
    for epoch in (0, 1, 10, 40, 79):
        assert sigmoid_rampup(epoch, 80) == pytest.approx(math.exp(-5 * (1 - epoch / 80) ** 2), rel=1e-12)
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(80, 80) == sigmoid_rampup(250, 80) == sigmoid_rampup(7, 0) == 1.0
    method = attached_one(2, rampup_epochs=80)
    torch.manual_seed(0)
    output = PeerOutput(torch.randn(2, 6, 10), torch.randn(2, 6, 8), torch.randn(6, TRUNK_CHANNELS, 2, 2))
    labels = torch.randint(0, 10, (6,))
    method.eval()  # same gate output at every call
    method.set_epoch(100, 300)
    full = method(output, labels, torch.arange(6))["kd"]
    for epoch in (0, 40):
        method.set_epoch(epoch, 300)
        assert method.consistency_weight() == pytest.approx(math.exp(-5 * (1 - epoch / 80) ** 2))
        torch.testing.assert_close(method(output, labels, torch.arange(6))["kd"], full * method.consistency_weight())
    assert ONE().rampup_epochs == 0  # the MCL-OKD reference: no ramp


def test_ensemble_is_the_gated_output():
    torch.manual_seed(0)
    method = attached_one(3).eval()
    output = PeerOutput(torch.randn(3, 5, 10), torch.randn(3, 5, 8), torch.randn(5, TRUNK_CHANNELS, 2, 2))
    weights = method.gate(output.trunk)
    expected = sum(weights[:, i:i + 1] * output.logits[i] for i in range(3))
    torch.testing.assert_close(method.ensemble(output), expected)
    assert not torch.allclose(method.ensemble(output), output.logits.mean(0))
    assert "gated" in ONE.ensemble_description


@pytest.mark.parametrize("option, value", [("kd_temperature", 0.0), ("kd_temperature", -1.0), ("ce_weight", -0.1),
                                           ("ensemble_ce_weight", -1.0), ("kd_weight", -2.0),
                                           ("rampup_epochs", -5)])
def test_invalid_options_are_config_errors(option, value):
    with pytest.raises(ConfigError, match=f"method.{option}"):
        ONE(**{option: value})


def _compose(overrides):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def test_reference_layout_and_parameter_count_of_one_resnet32():
    """Stem + layer1 + layer2 shared, layer3 + classifier per branch, gate Linear(32, 4) + BN1d(4):
    winycg/MCL-OKD one_resnet32(number_net=4) has 112,592 + 4 x 360,164 + 132 + 8 = 1,553,388 parameters."""
    peers, method = build_network(_compose(["method=one", "backbone=resnet32", "peers=4"]))
    reference = PeerNetwork.from_backbone("resnet32", 4)  # MCL-OKD's layout: stem + layer1 shared
    assert len(peers.trunk) == 3 and len(reference.trunk) == 2
    for ours, plain in zip(peers.trunk, list(reference.trunk) + [reference.branches[0][0]]):
        assert [p.shape for p in ours.parameters()] == [p.shape for p in plain.parameters()]
    assert peers.trunk_channels == 32 and method.gate.fc.in_features == 32
    assert count_parameters(peers.trunk) == 112_592
    assert count_parameters(peers) + count_parameters(method) == 1_553_388
    assert peers.export_peer(3).classifier.out_features == 100
    assert count_parameters(peers.export_peer(3)) == 472_756  # a deployed branch is a plain ResNet-32


def test_independent_topology_is_a_clear_error():
    with pytest.raises(ConfigError, match="topology=shared_trunk"):
        build_network(_compose(["method=one", "backbone=resnet20", "peers=2", "topology=independent"]))
    with pytest.raises(ConfigError, match="peers >= 2"):
        build_network(_compose(["method=one", "backbone=resnet20", "peers=1"]))


def test_loss_under_bf16_autocast_matches_float32():
    torch.manual_seed(0)
    peers = PeerNetwork.from_backbone("resnet20", num_peers=3, num_classes=10, layout=ONE.reference_layout)
    method = ONE(rampup_epochs=80)
    method.attach(peers.spec())
    method.set_epoch(80, 300)

    def check(output):
        assert output.trunk.dtype == torch.bfloat16
        assert method.gate(output.trunk).dtype == torch.float32

    fp32, bf16 = fp32_and_bf16_losses(peers, method, check)
    for name in ("ce", "ensemble_ce"):
        assert abs(bf16[name] - fp32[name]) / fp32[name] < 1e-2, name
