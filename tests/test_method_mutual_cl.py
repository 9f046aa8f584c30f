"""Mutual contrastive learning: every term and its gradient against float64 formulas, masks, layouts, CLI."""

from __future__ import annotations


import pytest
import torch
from hydra import compose, initialize_config_module

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import MutualCL
from mcl_lightning.models import PeerNetwork, PeerOutput, PeerSpec
from mcl_lightning.train import build_network

from conftest import attached, meta_training_step
from conftest import tiny_training_run

TERMS = ("ce", "vcl", "soft_vcl", "icl", "soft_icl")


def embed64(head, features):
    """The projection MLP in float64 from its weights: normalise(W2 relu(W1 h + b1) + b2)."""
    first, second = head.net[0], head.net[2]
    hidden = torch.relu(features @ first.weight.double().T + first.bias.double())
    z = hidden @ second.weight.double().T + second.bias.double()
    return z / z.norm(dim=1, keepdim=True)


def supcon64(s, labels):
    """SupCon of one (B, B) similarity matrix, anchor by anchor: positives are the other samples of the
    anchor's class, the denominator every column but the anchor's own; anchors without positives skipped."""
    b = len(labels)
    losses = []
    for a in range(b):
        others = [c for c in range(b) if c != a]
        positives = [c for c in others if labels[c] == labels[a]]
        if not positives:
            continue
        log_den = torch.log(sum(torch.exp(s[a, c]) for c in others))
        losses.append(-sum(s[a, p] - log_den for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else s.sum() * 0


def kl64(student, teacher, t):
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), mean over rows (the reference's KLDiv)."""
    q = torch.softmax(teacher / t, dim=1)
    return (q * (torch.log(q) - torch.log_softmax(student / t, dim=1))).sum(1).mean() * t * t


def reference_mcl(heads, features, logits, labels, tau=0.1, t=3.0, weights=(0.1, 1.0, 0.1, 1.0), logit_kd=False):
    """losses/cifar_sup_mcl_loss.py + main_cifar.py's total, term by term, with explicit loops."""
    alpha, gamma, beta, lam = weights
    n = len(features)
    z = [embed64(head, f) for head, f in zip(heads, features)]
    sim = {(i, j): z[i] @ z[j].T / tau for i in range(n) for j in range(n)}
    ce = sum(-torch.log_softmax(logits[i], 1)[torch.arange(len(labels)), labels].mean() for i in range(n))
    out = {
        "ce": ce,
        "vcl": alpha * sum(supcon64(sim[i, i], labels) for i in range(n)),
        "soft_vcl": gamma * sum(kl64(sim[i, i], sim[j, j].detach(), t) for i in range(n) for j in range(n) if i != j),
        "icl": beta * sum(supcon64(sim[i, j], labels) for i in range(n) for j in range(n) if i != j),
        "soft_icl": lam * sum(kl64(sim[i, j], sim[j, i].detach(), t) for i in range(n) for j in range(n) if i != j),
    }
    if logit_kd:
        teacher = (sum(logits) / n).detach()
        students = range(n) if n == 2 else [n - 1]
        out["logit_kd"] = sum(kl64(logits[k], teacher, t) for k in students)
    return out


def _inputs(n_peers, widths, batch, classes, labels, seed):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(batch, c, generator=g).requires_grad_(True) for c in widths]
    logits = (torch.randn(n_peers, batch, classes, generator=g) * 2).requires_grad_(True)
    return features, logits, torch.tensor(labels)


def _named(name):
    return lambda message: f"{name}: {message}"


def _check_against_reference(method, features, logits, labels, logit_kd=False, rtol=1e-5):
    stacked = torch.stack(features) if len({f.shape[1] for f in features}) == 1 else tuple(features)
    losses = method(PeerOutput(logits, stacked), labels, torch.arange(len(labels)))
    f64 = [f.detach().double().requires_grad_(True) for f in features]
    l64 = logits.detach().double().requires_grad_(True)
    weights = (method.alpha, method.gamma, method.beta, method.lam)
    expected = reference_mcl(method.heads, f64, l64, labels, method.tau, method.kd_temperature, weights, logit_kd)
    assert set(losses) == set(expected)
    params = list(method.heads.parameters())
    for name, value in losses.items():
        torch.testing.assert_close(value.double(), expected[name].detach(), rtol=rtol, atol=1e-6, msg=_named(name))
        # each term's gradient on its own, w.r.t. the features, the logits and the projection MLPs
        # (the float64 formula reads the MLP weights through .double(), so it differentiates them too)
        got = torch.autograd.grad(value, [*features, logits, *params], retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(expected[name], [*f64, l64, *params], retain_graph=True, allow_unused=True)
        for g, w in zip(got, want):
            assert (g is None) == (w is None), name
            if g is not None:
                # float32 vs float64: the tolerance follows the gradient's scale (entries are sums of
                # contributions up to T^2 / tau = 90 times larger, so small entries carry their rounding)
                scale = w.abs().max().item()
                torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5 * scale, msg=_named(name))
        if name != "ce" and name != "logit_kd":  # the contrastive terms train every projection MLP
            assert all(g is not None and g.abs().sum() > 0 for g in got[len(features) + 1:]), name
    return losses


# two samples of most classes, one singleton (an anchor without a positive), one class of three
LABELS = [0, 0, 1, 1, 2, 3, 3, 3, 4, 4]


@pytest.mark.parametrize("n_peers", [2, 4])
def test_every_term_and_gradient_matches_float64_formula(n_peers):
    torch.manual_seed(n_peers)
    features, logits, labels = _inputs(n_peers, [12] * n_peers, len(LABELS), 7, LABELS, seed=n_peers)
    method = attached(MutualCL(projection_dim=16), n_peers, 12, num_classes=7)
    losses = _check_against_reference(method, features, logits, labels)
    assert set(losses) == set(TERMS) and all(v.abs() > 0 for v in losses.values())


@pytest.mark.parametrize("n_peers", [2, 4])
def test_logit_distillation_matches_the_reference_targets(n_peers):
    """Weight 1, T = 3, teacher = detached mean of all logits; both peers if N = 2, else the last one."""
    torch.manual_seed(0)
    features, logits, labels = _inputs(n_peers, [8] * n_peers, len(LABELS), 5, LABELS, seed=10 + n_peers)
    method = attached(MutualCL(projection_dim=8, logit_distill=True), n_peers, 8, num_classes=5)
    losses = _check_against_reference(method, features, logits, labels, logit_kd=True)
    (grad,) = torch.autograd.grad(losses["logit_kd"], logits)
    students = {0, 1} if n_peers == 2 else {n_peers - 1}
    assert {i for i in range(n_peers) if grad[i].abs().sum() > 0} == students


def test_weights_and_temperatures_are_the_options():
    torch.manual_seed(1)
    features, logits, labels = _inputs(3, [8] * 3, len(LABELS), 5, LABELS, seed=3)
    method = attached(MutualCL(projection_dim=8, tau=0.5, kd_temperature=2.0, alpha=0.3, gamma=0.2, beta=0.7,
                               lam=0.4), 3, 8, num_classes=5)
    _check_against_reference(method, features, logits, labels)


def test_heterogeneous_networks_each_get_their_own_projection_mlp():
    torch.manual_seed(2)
    widths = (16, 24, 8)
    features, logits, labels = _inputs(3, widths, len(LABELS), 5, LABELS, seed=4)
    method = MutualCL(projection_dim=8)
    method.attach(PeerSpec(3, widths, 5, "independent", None, ("resnet20", "wrn_16_2", "resnet32")))
    assert [head.net[0].in_features for head in method.heads] == list(widths)
    assert all(head.net[2].out_features == 8 for head in method.heads)
    _check_against_reference(method, features, logits, labels)


def test_anchors_without_positives_are_safe():
    """No same-class partner: the reference divides 0 by 0 (NaN); here such anchors leave the mean."""
    torch.manual_seed(3)
    method = attached(MutualCL(projection_dim=8), 2, 8, num_classes=10)
    for labels in ([0, 1, 2, 3, 4, 5], [7]):  # all distinct; a batch of one
        features, logits, labels = _inputs(2, [8, 8], len(labels), 10, labels, seed=5)
        losses = method(PeerOutput(logits, torch.stack(features)), labels, labels)
        assert losses["vcl"] == 0 and losses["icl"] == 0
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        assert all(torch.isfinite(f.grad).all() for f in features)
        assert all(torch.isfinite(p.grad).all() for p in method.heads.parameters() if p.grad is not None)
        method.zero_grad()
    # one anchor without a positive among others: the mean over the anchors that have one
    features, logits, labels = _inputs(2, [8, 8], len(LABELS), 5, LABELS, seed=6)
    _check_against_reference(method, features, logits, labels)


def test_contrastive_terms_under_bf16_autocast_are_float32_and_close():
    torch.manual_seed(4)
    n, batch = 2, 16
    labels = torch.arange(batch) // 2  # class-balanced, m = 2
    method = attached(MutualCL(), n, 64)
    features = torch.randn(n, batch, 64).bfloat16().requires_grad_(True)
    logits = torch.randn(n, batch, 100).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = method(PeerOutput(logits, features), labels, labels)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    plain = method(PeerOutput(logits.float(), features.detach().float()), labels, labels)
    for name in losses:  # same bf16 inputs: the contrastive path ran in float32
        torch.testing.assert_close(losses[name], plain[name], rtol=1e-4, atol=1e-5, msg=_named(name))
    sum(losses.values()).backward()
    assert torch.isfinite(features.grad.float()).all()


def test_training_step_has_no_host_sync():
    """On the meta device any .item() or data-dependent shape raises."""
    peers = PeerNetwork.from_backbone("resnet20", num_peers=3, num_classes=10)
    method = MutualCL(logit_distill=True)
    method.attach(peers.spec())
    losses = meta_training_step(peers, method)
    assert set(losses) == {*TERMS, "logit_kd"}


def _compose(overrides):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def test_reference_layout_is_independent_for_two_peers_and_shared_otherwise():
    peers, method = build_network(_compose(["method=mutual_cl", "peers=2", "backbone=resnet20"]))
    assert peers.topology == "independent" and method.layout_peers == 2
    peers, _ = build_network(_compose(["method=mutual_cl", "peers=4", "backbone=resnet20"]))
    assert peers.topology == "shared_trunk" and peers.build_spec["branch_point"] == 2  # stem + layer1
    peers, _ = build_network(_compose(["method=mutual_cl", "peers=2", "backbone=resnet20", "topology=shared_trunk"]))
    assert peers.topology == "shared_trunk"  # topology= overrides the reference
    peers, method = build_network(_compose(["method=mutual_cl", "peers=[resnet20,wrn_16_2,resnet32]"]))
    assert peers.topology == "independent" and method.layout_peers == 3
    assert [head.net[0].in_features for head in method.heads] == [64, 128, 64]
    assert MutualCL().reference_layout.topology == "shared_trunk"  # Python use without a hint


def test_defaults_and_config_errors():
    cfg = _compose(["method=mutual_cl"]).method
    assert (cfg.alpha, cfg.gamma, cfg.beta, cfg.lam, cfg.tau, cfg.kd_temperature) == (0.1, 1.0, 0.1, 1.0, 0.1, 3.0)
    assert cfg.projection_dim == 128 and cfg.logit_distill is False
    with pytest.raises(ConfigError, match="tau"):
        MutualCL(tau=0)
    with pytest.raises(ConfigError, match="weights"):
        MutualCL(lam=-1)
    with pytest.raises(ConfigError, match="peers >= 2"):
        attached(MutualCL(), 1, 8)


def _run_and_check(tmp_path, data_root, *overrides):
    results, rows, _ = tiny_training_run(tmp_path / "run", data_root, "method=mutual_cl", *overrides, terms=TERMS)
    return results, rows


def test_cli_run_with_class_balanced_batches(tmp_path, data_root):
    results, _ = _run_and_check(tmp_path, data_root, "peers=2", "backbone=resnet20", "data.samples_per_class=2")
    assert results["method"] == "mutual_cl" and results["peers"] == 2 and results["topology"] == "independent"
    assert results["config"]["data"]["samples_per_class"] == 2
    assert {"peer0", "peer1", "peer_mean", "ensemble"} <= set(results["final"])


@pytest.mark.slow  # heterogeneous peers through the CLI: test_train.py runs them by default
def test_cli_run_with_three_different_backbones_and_plain_shuffling(tmp_path, data_root):
    """Plain shuffled batches of 64 from 100 classes: many anchors have no positive; the losses stay finite."""
    results, _ = _run_and_check(tmp_path, data_root, "peers=[resnet20,wrn_16_2,resnet32]",
                                "trainer.limit_train_batches=2")
    assert results["backbone"] == "resnet20+wrn_16_2+resnet32" and results["peers"] == 3
