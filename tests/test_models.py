"""Backbone registry, parameter counts against the reference, peer topologies, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.models import (
    TOPOLOGIES,
    PeerLayout,
    PeerNetwork,
    StagedBackbone,
    count_parameters,
    create_backbone,
    list_backbones,
    register_backbone,
)

# Exact counts at 100 classes. Reference figures (method.md §2, §9.4): ResNet-32 0.4728M,
# ResNet-110 (bottleneck) 1.1709M, DenseNet-40-12 0.1881M, VGG-16 14.7744M, HCGNet-A1 1.1027M;
# WRN-16-2 1.407M, WRN-40-2 4.510M and ShuffleNetV2-1x 2.712M for two independent nets.
# HCGNet-A2, ShuffleNetV2-0.5x and WRN-28-4 have no published count (tests/test_backbones.py checks
# their structure). ImageNet ResNet-18/34 at 1000 classes: tests/test_backbones.py.
PLAIN_PARAMS = {
    "densenet40_12": 188_092,
    "hcgnet_a1": 1_102_651,
    "hcgnet_a2": 3_133_679,
    "resnet18": 11_227_812,
    "resnet8": 83_892,  # by hand: stem 464 + stages 4,672 + 14,528 + 57,728 + classifier 6,500
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet34": 21_335_972,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet110_bottleneck": 1_170_868,
    "shufflenetv2_0_5": 444_292,
    "shufflenetv2_1_0": 1_356_104,
    "vgg16": 14_774_436,
    "wrn_16_2": 703_284,
    "wrn_28_4": 5_872_180,
    "wrn_40_2": 2_255_156,
}
# Four shared-trunk peers, projection heads excluded (method.md §2 and §9.4, in millions; VGG-16
# 53.88M, stated to two decimals, and ImageNet ResNets: tests/test_backbones.py).
REFERENCE_SHARED_TRUNK_X4 = {
    "resnet32": 1.820, "resnet110_bottleneck": 4.517, "wrn_16_2": 2.713, "wrn_40_2": 8.698,
    "densenet40_12": 0.592, "hcgnet_a1": 4.057, "shufflenetv2_1_0": 5.332,
}
FEATURE_DIM = {
    "resnet110_bottleneck": 256, "wrn_16_2": 128, "wrn_40_2": 128, "wrn_28_4": 256, "vgg16": 512,
    "densenet40_12": 132, "hcgnet_a1": 414, "hcgnet_a2": 716, "shufflenetv2_0_5": 1024,
    "shufflenetv2_1_0": 1024, "resnet18": 512, "resnet34": 512,
}


def test_registry_lists_every_backbone_with_a_count():
    assert sorted(PLAIN_PARAMS) == list_backbones()


@pytest.mark.parametrize("name", sorted(PLAIN_PARAMS))
def test_plain_backbone_parameter_count_and_shapes(name):
    net = create_backbone(name, num_classes=100)
    assert count_parameters(net) == PLAIN_PARAMS[name]
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 100)
    assert net.forward_features(x).shape == (2, FEATURE_DIM.get(name, 64))


def test_reference_parameter_counts_in_millions():
    assert round(PLAIN_PARAMS["resnet32"] / 1e6, 4) == 0.4728
    assert round(PLAIN_PARAMS["resnet110_bottleneck"] / 1e6, 4) == 1.1709
    assert round(2 * PLAIN_PARAMS["wrn_16_2"] / 1e6, 3) == 1.407
    assert round(2 * PLAIN_PARAMS["wrn_40_2"] / 1e6, 3) == 4.510
    assert round(PLAIN_PARAMS["densenet40_12"] / 1e6, 4) == 0.1881
    assert round(PLAIN_PARAMS["vgg16"] / 1e6, 4) == 14.7744
    assert round(PLAIN_PARAMS["hcgnet_a1"] / 1e6, 4) == 1.1027
    assert round(2 * PLAIN_PARAMS["shufflenetv2_1_0"] / 1e6, 3) == 2.712
    for name, millions in REFERENCE_SHARED_TRUNK_X4.items():
        peers = PeerNetwork.from_backbone(name, num_peers=4, topology="shared_trunk")
        assert round(count_parameters(peers) / 1e6, 3) == millions, name


@pytest.mark.parametrize("name", sorted(PLAIN_PARAMS))
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_peer_network_shapes_and_counts(name, topology):
    peers = PeerNetwork.from_backbone(name, num_peers=3, topology=topology, num_classes=10)
    out = peers(torch.randn(2, 3, 32, 32))
    c = FEATURE_DIM.get(name, 64)
    assert out.logits.shape == (3, 2, 10) and out.features.shape == (3, 2, c)
    assert out.num_peers == 3 and peers.feature_dim == c
    single = PeerNetwork.from_backbone(name, num_peers=1, topology=topology, num_classes=10)
    plain = count_parameters(create_backbone(name, num_classes=10))
    assert count_parameters(single) == plain  # N = 1 is exactly the plain backbone
    if topology == "independent":
        assert count_parameters(peers) == 3 * plain
    else:
        trunk = count_parameters(peers.trunk)
        assert trunk > 0 and count_parameters(peers) == 3 * plain - 2 * trunk


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_exported_peer_is_the_plain_backbone_with_the_same_outputs(topology):
    peers = PeerNetwork.from_backbone("resnet20", num_peers=3, topology=topology, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    out = peers(x)
    plain = count_parameters(create_backbone("resnet20", num_classes=10))
    for i in range(3):
        deployed = peers.export_peer(i).eval()
        assert isinstance(deployed, StagedBackbone)
        assert count_parameters(deployed) == plain
        torch.testing.assert_close(deployed(x), out.logits[i])
        # and its state dict is that of the registry's backbone
        create_backbone("resnet20", num_classes=10).load_state_dict(deployed.state_dict())


def test_branch_point_override_moves_the_split():
    default = PeerNetwork.from_backbone("resnet20", num_peers=2)
    deeper = PeerNetwork.from_backbone("resnet20", num_peers=2, branch_point=3)
    assert len(default.trunk) == 2 and len(deeper.trunk) == 3
    assert count_parameters(deeper) < count_parameters(default)
    with pytest.raises(ConfigError, match="branch_point"):
        PeerNetwork.from_backbone("resnet20", num_peers=2, branch_point=9)


def test_bad_names_give_clear_errors():
    with pytest.raises(ConfigError, match="resnet32"):  # the message lists the valid names
        create_backbone("resnet33")
    with pytest.raises(ConfigError, match="shared_trunk"):
        PeerNetwork.from_backbone("resnet20", topology="star")
    with pytest.raises(ConfigError, match="peers"):
        PeerNetwork.from_backbone("resnet20", num_peers=0)


def test_from_modules_adapter_with_torchvision_networks():
    from torchvision.models import resnet18

    nets = [resnet18(num_classes=7) for _ in range(2)]
    peers = PeerNetwork.from_modules(nets, classifier="fc")
    out = peers(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 2, 7) and out.features.shape == (2, 2, 512)
    peers.eval()
    x = torch.randn(2, 3, 64, 64)
    deployed = peers.export_peer(1).eval()
    torch.testing.assert_close(deployed(x), peers(x).logits[1])
    assert isinstance(deployed.fc, nn.Linear)
    with pytest.raises(ConfigError, match="head"):
        PeerNetwork.from_modules(nets, classifier="head")


def test_registering_a_new_backbone_needs_no_other_change(monkeypatch):
    from mcl_lightning.models import registry

    monkeypatch.setattr(registry.BACKBONES, "_entries", dict(registry.BACKBONES._entries))  # leave the real one untouched

    @register_backbone("tiny_test_net")
    def tiny(num_classes: int = 100) -> StagedBackbone:
        stages = [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)]
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        return StagedBackbone(stages, pool, nn.Linear(8, num_classes), 8, branch_point=1)

    peers = PeerNetwork.from_backbone("tiny_test_net", num_peers=2, num_classes=5)
    assert peers(torch.randn(1, 3, 8, 8)).logits.shape == (2, 1, 5)


def test_pair_stage_layout_is_a_binary_tree_and_exports_plain_peers():
    """CL-ILR's layout: stem + stage 1 shared by all, stage 2 by pairs (0, 1) and (2, 3), stage 3 own."""
    tree = PeerNetwork.from_backbone("resnet20", num_peers=4, num_classes=10, layout=PeerLayout(pair_stage=True)).eval()
    plain = create_backbone("resnet20", num_classes=10)
    stage = [count_parameters(s) for s in plain.stages]
    head = count_parameters(plain.pool) + count_parameters(plain.classifier)
    assert count_parameters(tree) == stage[0] + stage[1] + 2 * stage[2] + 4 * (stage[3] + head)
    assert tree.group_of == [0, 0, 1, 1] and len(tree.groups) == 2
    odd = PeerNetwork.from_backbone("resnet20", num_peers=3, layout=PeerLayout(pair_stage=True))
    assert odd.group_of == [0, 0, 1]  # the last peer owns its pair-stage alone
    x = torch.randn(2, 3, 32, 32)
    out = tree(x)
    for i in range(4):
        torch.testing.assert_close(tree.export_peer(i).eval()(x), out.logits[i])
    assert out.trunk is not None and out.trunk.shape[1] == tree.spec().trunk_channels == 16


def test_split_gradients_are_divided_by_the_children_at_each_split():
    """ILR: identity forward; the gradient into the trunk is 1/2 (two groups), into each pair stage 1/2."""
    torch.manual_seed(0)
    plain = PeerNetwork.from_backbone("resnet20", num_peers=4, num_classes=10, layout=PeerLayout(pair_stage=True))
    scaled = PeerNetwork.from_backbone("resnet20", num_peers=4, num_classes=10,
                                       layout=PeerLayout(pair_stage=True, rescale_split_gradients=True))
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    a, b = plain(x), scaled(x)
    torch.testing.assert_close(a.logits, b.logits)  # identity forward
    a.logits.sum().backward()
    b.logits.sum().backward()
    last_group_conv = lambda net: net.groups[1][0].conv1.weight.grad  # noqa: E731
    trunk_conv = lambda net: net.trunk[0][0].weight.grad  # noqa: E731
    torch.testing.assert_close(last_group_conv(scaled), last_group_conv(plain) / 2)
    torch.testing.assert_close(trunk_conv(scaled), trunk_conv(plain) / 4, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scaled.branches[3][0][0].conv1.weight.grad, plain.branches[3][0][0].conv1.weight.grad)


def test_heterogeneous_peers_keep_their_own_widths_and_export_their_own_backbone():
    peers = PeerNetwork.from_backbone(["resnet20", "wrn_16_2", "resnet110_bottleneck"], num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    out = peers(x)
    assert peers.topology == "independent" and out.trunk is None
    assert out.feature_dims == peers.feature_dims == (64, 128, 256) and isinstance(out.features, tuple)
    with pytest.raises(ValueError, match="different feature widths"):
        out.stacked_features()
    for i, name in enumerate(["resnet20", "wrn_16_2", "resnet110_bottleneck"]):
        deployed = peers.export_peer(i).eval()
        assert count_parameters(deployed) == count_parameters(create_backbone(name, num_classes=10))
        torch.testing.assert_close(deployed(x), out.logits[i])
    rebuilt = PeerNetwork.from_backbone(**peers.build_spec)
    assert rebuilt.feature_dims == peers.feature_dims
    with pytest.raises(ConfigError, match="cannot share a trunk"):
        PeerNetwork.from_backbone(["resnet20", "wrn_16_2"], topology="shared_trunk")


def test_method_layout_moves_the_branch_point_unless_overridden():
    later = PeerNetwork.from_backbone("resnet20", num_peers=2, layout=PeerLayout(branch_offset=1))
    assert len(later.trunk) == 3  # stem, layer1, layer2: ONE's and OKDDip's split
    explicit = PeerNetwork.from_backbone("resnet20", num_peers=2, branch_point=2, layout=PeerLayout(branch_offset=1))
    assert len(explicit.trunk) == 2
    apart = PeerNetwork.from_backbone("resnet20", num_peers=2, layout=PeerLayout(topology="independent"))
    assert apart.topology == "independent" and apart.spec().trunk_channels is None
