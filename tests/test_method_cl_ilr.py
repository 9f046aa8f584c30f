"""CL-ILR: loss and gradients against float64 formulas, ILR's backward scaling, layout, ensemble, CLI."""

from __future__ import annotations


import pytest
import torch
from hydra import compose, initialize_config_module

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import CLILR
from mcl_lightning.models import PeerLayout, PeerNetwork, PeerOutput, PeerSpec
from mcl_lightning.train import build_network

from conftest import attached, meta_training_step


def reference_cl_ilr(logits, labels, t=2.0):
    """main_cifar_cl_ilr.py's loss, one peer at a time, in float64: (CE term, KL term)."""
    n = logits.shape[0]
    ce = kd = 0.0
    for i in range(n):
        log_p = torch.log_softmax(logits[i], dim=1)
        ce = ce + 0.5 * -log_p[torch.arange(len(labels)), labels].mean()
        teacher = sum(logits[j] for j in range(n) if j != i).detach() / (n - 1)
        q = torch.softmax(teacher / t, dim=1)
        log_p_t = torch.log_softmax(logits[i] / t, dim=1)
        kd = kd + 0.5 * (q * (q.log() - log_p_t)).sum(1).mean() * t * t
    return ce, kd


@pytest.mark.parametrize("n_peers", [2, 4])
def test_loss_terms_and_gradients_match_float64_formula(n_peers):
    g = torch.Generator().manual_seed(n_peers)
    batch, classes = 6, 10
    logits = (torch.randn(n_peers, batch, classes, generator=g) * 3).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), generator=g)
    method = attached(CLILR(), n_peers, 16, num_classes=classes)
    losses = method(PeerOutput(logits, torch.zeros(n_peers, batch, 16)), labels, torch.arange(batch))
    assert set(losses) == {"ce", "collaborative_kd"}

    l64 = logits.detach().double().requires_grad_(True)
    expected = dict(zip(("ce", "collaborative_kd"), reference_cl_ilr(l64, labels)))
    for name in losses:
        torch.testing.assert_close(losses[name].double(), expected[name].detach(), rtol=1e-6, atol=1e-6)
        # each term's gradient on its own: the KL teacher is detached in both
        (got,) = torch.autograd.grad(losses[name], logits, retain_graph=True)
        (want,) = torch.autograd.grad(expected[name], l64, retain_graph=True)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_options_change_weights_temperature_and_ensemble():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (5,), generator=g)
    output = PeerOutput(logits, torch.zeros(3, 5, 4))
    base = attached(CLILR(), 3, 4, num_classes=7)(output, labels, labels)
    other = attached(CLILR(kd_temperature=4.0, gamma=1.0, alpha=2.0), 3, 4, num_classes=7)(output, labels, labels)
    ce, kd = reference_cl_ilr(logits.double(), labels, t=4.0)
    torch.testing.assert_close(other["ce"].double(), 2 * ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(other["collaborative_kd"].double(), 4 * kd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(other["ce"], 2 * base["ce"])

    reference = CLILR()
    torch.testing.assert_close(reference.ensemble(output), logits[:2].mean(0))  # peers 0..N-2
    assert "0..N-2" in reference.ensemble_description
    plain = CLILR(ensemble="all")
    torch.testing.assert_close(plain.ensemble(output), logits.mean(0))
    assert plain.ensemble_description == "mean of the peers' logits"


def test_collaborative_kd_under_bf16_autocast_is_float32_and_close():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 8, 100, generator=g).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 100, (8,), generator=g)
    method = attached(CLILR(), 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = method(PeerOutput(logits, torch.zeros(4, 8, 16, dtype=torch.bfloat16)), labels, labels)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    ce, kd = reference_cl_ilr(logits.detach().double(), labels)
    torch.testing.assert_close(losses["collaborative_kd"].double(), kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["ce"].double(), ce, rtol=1e-5, atol=1e-5)
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad.float()).all()


# (trunk factor, pair-stage factor) of each peer's gradient: 1 / children at each split on its path.
ILR_FACTORS = {
    2: [(1 / 2, 1 / 2)] * 2,  # one pair stage (no split at the trunk), two children
    3: [(1 / 4, 1 / 2)] * 2 + [(1 / 2, 1.0)],  # the odd peer owns its stage alone
    4: [(1 / 4, 1 / 2)] * 4,  # the reference's ILR(x, 2) after layer1 and after each layer2_i
}


@pytest.mark.parametrize("n_peers", [2, 3, 4])
def test_ilr_divides_the_gradient_by_the_children_of_each_split(n_peers):
    """Gradient reaching the trunk and the pair stage vs. the same network without ILR, one peer at a time."""
    torch.manual_seed(0)
    scaled = PeerNetwork.from_backbone("resnet20", n_peers, num_classes=10, layout=CLILR().reference_layout)
    plain = PeerNetwork.from_backbone("resnet20", n_peers, num_classes=10, layout=PeerLayout(pair_stage=True))
    plain.load_state_dict(scaled.state_dict())
    assert scaled.rescale_split_gradients and not plain.rescale_split_gradients
    assert scaled.group_of == [i // 2 for i in range(n_peers)]  # pairs (0, 1), (2, 3), ...
    x = torch.randn(2, 3, 16, 16)  # small images keep it fast; the pooling is global
    weights = torch.randn(2, 10)
    logits = [net(x).logits for net in (scaled, plain)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)  # identity forward
    names = [name for name, _ in scaled.named_parameters()]
    for peer, (trunk_factor, pair_factor) in enumerate(ILR_FACTORS[n_peers]):
        got, want = (
            torch.autograd.grad((out[peer] * weights).sum(), list(net.parameters()), retain_graph=True,
                                allow_unused=True)
            for out, net in zip(logits, (scaled, plain))
        )
        shared = {"trunk.": trunk_factor, f"groups.{peer // 2}.": pair_factor}
        for name, g, w in zip(names, got, want):
            g, w = (torch.zeros(1) if t is None else t for t in (g, w))
            factor = next((f for prefix, f in shared.items() if name.startswith(prefix)), 1.0)
            if factor != 1.0:
                assert w.abs().sum() > 0, name  # the comparison is not between zeros
            torch.testing.assert_close(g, w * factor, rtol=1e-5, atol=1e-8, msg=name)


def test_single_split_divides_by_n_one_stage_later():
    torch.manual_seed(0)
    layout = CLILR(sharing="single").reference_layout
    scaled = PeerNetwork.from_backbone("resnet20", 3, num_classes=10, layout=layout)
    plain = PeerNetwork.from_backbone("resnet20", 3, num_classes=10, layout=PeerLayout(branch_offset=1))
    plain.load_state_dict(scaled.state_dict())
    assert scaled.groups is None and scaled.build_spec["branch_point"] == 3  # stem + layer1 + layer2
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for net in (scaled, plain):
        net(x).logits.sum().backward()
        grads.append(dict(net.trunk.named_parameters()))
    for name, p in grads[0].items():  # three branches' sums, summed in another order: float tolerance
        want = grads[1][name].grad / 3
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    for name, p in scaled.branches.named_parameters():  # the branches themselves are not rescaled
        torch.testing.assert_close(p.grad, dict(plain.branches.named_parameters())[name].grad)


def _compose(overrides):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def test_entry_point_builds_the_reference_tree_or_the_single_split():
    peers, method = build_network(_compose(["method=cl_ilr", "peers=4", "backbone=resnet20"]))
    assert isinstance(method, CLILR) and method.spec == peers.spec()
    assert len(peers.groups) == 2 and peers.rescale_split_gradients and peers.build_spec["layout"]["pair_stage"]
    peers, method = build_network(_compose(["method=cl_ilr", "method.sharing=single", "peers=4", "backbone=resnet20"]))
    assert peers.groups is None and peers.rescale_split_gradients and peers.build_spec["branch_point"] == 3
    peers, _ = build_network(_compose(["method=cl_ilr", "peers=3", "backbone=resnet20", "topology=independent"]))
    assert peers.topology == "independent"


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="method.sharing"):
        CLILR(sharing="chain")
    with pytest.raises(ConfigError, match="method.ensemble"):
        CLILR(ensemble="best")
    with pytest.raises(ConfigError, match="kd_temperature"):
        CLILR(kd_temperature=0)
    with pytest.raises(ConfigError, match="peers >= 2"):
        attached(CLILR(), 1, 8)
    with pytest.raises(ConfigError, match="one backbone"):
        CLILR().attach(PeerSpec(2, (64, 128), 100, "independent", None, ("resnet20", "wrn_16_2")))


def test_training_step_has_no_host_sync():
    """On the meta device any .item() or data-dependent shape raises."""
    peers = PeerNetwork.from_backbone("resnet20", num_peers=4, num_classes=10, layout=CLILR().reference_layout)
    method = CLILR()
    method.attach(peers.spec())
    meta_training_step(peers, method)
