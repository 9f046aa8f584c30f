"""perf.fuse_peers: identical peers as one grouped network, against the per-peer loop on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import MCLOKD, Independent
from mcl_lightning.models import PeerLayout, PeerNetwork, create_backbone
from mcl_lightning.models.fused import FusedPeerNetwork, _to_peer_layout
from mcl_lightning.system import OKDSystem


def _pair(backbone="resnet20", peers=3, topology="independent", classes=10, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    loop = PeerNetwork.from_backbone(backbone, peers, topology, classes).to(dtype)
    return loop, FusedPeerNetwork.from_peers(copy.deepcopy(loop))


def _grads(module):
    grads = {name: p.grad for name, p in module.named_parameters()}
    if isinstance(module, FusedPeerNetwork):
        _to_peer_layout(module, grads, "", None)
    return grads


@pytest.mark.parametrize("backbone,topology,size", [
    ("resnet20", "independent", 16), ("resnet20", "shared_trunk", 16), ("wrn_16_2", "independent", 8),
    ("resnet110_bottleneck", "shared_trunk", 8),
])
def test_outputs_gradients_and_running_stats_equal_the_loop(backbone, topology, size):
    """In float64 (where rounding cannot hide a wrong construction: BatchNorm backward at batch 6
    loses up to ~20 % of some float32 gradients to cancellation, in the loop as much as fused)."""
    loop, fused = _pair(backbone, topology=topology, dtype=torch.float64)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)  # any size: the pooling is adaptive
    labels = torch.randint(0, 10, (3,))
    outs = []
    for net in (loop, fused):
        out = net(x)
        loss = Independent()(out, labels, torch.arange(3))["ce"] + out.features.pow(2).mean()
        loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[1].features, outs[0].features, rtol=1e-10, atol=1e-12)
    assert (outs[1].trunk is None) == (topology == "independent")
    expected, got = _grads(loop), _grads(fused)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)
    states = loop.state_dict(), fused.state_dict()  # running stats after the training-mode forward
    assert set(states[1]) == set(states[0])
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=1e-10, atol=1e-12)


def test_float32_outputs_equal_the_loop():
    loop, fused = _pair("resnet20", topology="shared_trunk")
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(fused(x).logits, loop(x).logits, rtol=1e-4, atol=1e-5)


def test_sgd_training_follows_the_loop_and_eval_matches():
    """Two SGD steps (momentum, Nesterov, weight decay) in train mode, then eval-mode outputs."""
    loop, fused = _pair("resnet20", peers=2, dtype=torch.float64)
    opts = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
            for net in (loop, fused)]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (4,), generator=g)
        for net, opt in zip((loop, fused), opts):
            opt.zero_grad()
            Independent()(net(x), y, torch.arange(4))["ce"].backward()
            opt.step()
    for name, value in loop.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, rtol=1e-9, atol=1e-12)
    loop.eval(), fused.eval()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x).logits, loop(x).logits, rtol=1e-9, atol=1e-12)


def test_checkpoint_layout_export_and_round_trip():
    loop, fused = _pair("resnet20", peers=3, topology="shared_trunk")
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # fused weights now differ from the loop's
    state = fused.state_dict()
    assert set(state) == set(loop.state_dict())  # the PeerNetwork's keys: checkpoints are interchangeable
    rebuilt = PeerNetwork.from_backbone(**fused.build_spec)
    rebuilt.load_state_dict(state)
    x = torch.randn(4, 3, 16, 16)
    fused.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x).logits, fused(x).logits, rtol=1e-4, atol=1e-5)
    plain = fused.export_peer(2)
    assert type(plain).__name__ == "StagedBackbone"
    torch.testing.assert_close(plain.eval()(x), fused(x).logits[2], rtol=1e-4, atol=1e-5)
    other = FusedPeerNetwork.from_peers(PeerNetwork.from_backbone("resnet20", 3, "shared_trunk", 10))
    other.load_state_dict(state)  # per-peer keys back into the fused layout
    other.eval()
    torch.testing.assert_close(other(x).logits, fused(x).logits)
    assert fused.spec() == loop.spec() and fused.topology == "shared_trunk" and fused.num_peers == 3


def test_through_okd_system_with_mcl_okd():
    loop, fused = _pair("resnet20", peers=2, topology="shared_trunk")
    system = OKDSystem(fused, MCLOKD(nce_k=8))
    assert system.method.spec == loop.spec()
    assert sum(p.numel() for p in system.peers.parameters()) == sum(p.numel() for p in loop.parameters())


def test_what_cannot_be_fused_is_a_clear_error():
    hetero = PeerNetwork.from_backbone(["resnet20", "wrn_16_2"], topology="independent", num_classes=10)
    with pytest.raises(ConfigError, match="fuse_peers"):
        FusedPeerNetwork.from_peers(hetero)
    pairs = PeerNetwork.from_backbone("resnet20", 4, "shared_trunk", 10, layout=PeerLayout(pair_stage=True))
    with pytest.raises(ConfigError, match="pair-shared"):
        FusedPeerNetwork.from_peers(pairs)
    odd = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Upsample(scale_factor=2),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1))
    with pytest.raises(ConfigError, match="cannot fuse Upsample"):
        FusedPeerNetwork.from_peers(PeerNetwork([odd, copy.deepcopy(odd)], [torch.nn.Linear(8, 3)] * 2, feature_dims=[8, 8]))
    assert create_backbone("resnet20", num_classes=10) is not None


def test_fused_step_never_reads_values_back_to_the_host():
    """On the meta device any value read back to the host raises: the fused forward, MCL-OKD's
    loss and the backward need none (the step stays free of synchronisation on a GPU)."""
    _, fused = _pair("resnet20", peers=2, topology="independent")
    method = MCLOKD(nce_k=16)
    method.attach(fused.spec())
    method.setup_data(torch.arange(200) % 10)
    fused, method = fused.to("meta"), method.to("meta")
    images = torch.empty(4, 3, 32, 32, device="meta")
    labels = torch.empty(4, dtype=torch.long, device="meta")
    losses = method(fused(images), labels, torch.empty(4, dtype=torch.long, device="meta"))
    torch.stack(list(losses.values())).sum().backward()
    assert fused.classifier_weight.grad.device.type == "meta"
