"""The backbones of the MCL-OKD and MCL tables beyond the CIFAR ResNets: reference structure, branch
points, parameter counts, both topologies, deployment, and one tiny real-data MCL-OKD run each.

Exact counts of every registry entry at 100 classes: tests/test_models.py (PLAIN_PARAMS).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision


from mcl_lightning.export import export_peer
from mcl_lightning.models import TOPOLOGIES, PeerNetwork, StagedBackbone, count_parameters, create_backbone

from test_train import TINY, run_train

NEW_CIFAR = ["densenet40_12", "hcgnet_a1", "hcgnet_a2", "shufflenetv2_0_5", "shufflenetv2_1_0", "vgg16", "wrn_28_4"]
IMAGENET = ["resnet18", "resnet34"]


def _input(name: str, batch: int = 2) -> torch.Tensor:
    size = 64 if name in IMAGENET else 32  # ImageNet nets train at 224; any size >= 32 works, 64 is cheap
    return torch.randn(batch, 3, size, size)


# Output (channels, height) of every stage for a 32x32 input (64x64 for ImageNet ResNets), from the
# references' constructors (method.md §9); the branch point is where the shared trunk stops.
STAGES = {
    "vgg16": [(64, 16), (128, 8), (256, 4), (512, 2), (512, 1)],
    "densenet40_12": [(24, 32), (48, 16), (60, 8), (132, 8)],
    "hcgnet_a1": [(24, 32), (60, 16), (126, 8), (414, 8)],
    "hcgnet_a2": [(48, 32), (120, 16), (204, 8), (716, 8)],
    "shufflenetv2_0_5": [(24, 32), (48, 16), (96, 8), (192, 4), (1024, 4)],
    "shufflenetv2_1_0": [(24, 32), (116, 16), (232, 8), (464, 4), (1024, 4)],
    "wrn_28_4": [(16, 32), (64, 32), (128, 16), (256, 8)],
    "resnet18": [(64, 16), (64, 16), (128, 8), (256, 4), (512, 2)],
    "resnet34": [(64, 16), (64, 16), (128, 8), (256, 4), (512, 2)],
}
# The reference's shared part (method.md §2, §9.4): stem + first stage, or up to layer2 / transition1.
BRANCH_POINT = {"vgg16": 3, "resnet18": 3, "resnet34": 3}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_widths_resolutions_and_branch_point_follow_the_reference(name):
    net = create_backbone(name, num_classes=100).eval()
    x = _input(name)
    shapes = []
    with torch.no_grad():
        for stage in net.stages:
            x = stage(x)
            shapes.append((x.shape[1], x.shape[2]))
    assert shapes == STAGES[name]
    assert net.branch_point == BRANCH_POINT.get(name, 2)
    assert net.feature_dim == STAGES[name][-1][0] == net.classifier.in_features


def test_imagenet_resnets_are_torchvisions_networks_with_the_reference_counts():
    # method.md §2: 11.69M / 21.80M alone, 44.71M / 83.15M as four shared-trunk peers (1000 classes).
    for name, factory, alone, four in (("resnet18", torchvision.models.resnet18, 11.69, 44.71),
                                       ("resnet34", torchvision.models.resnet34, 21.80, 83.15)):
        ours = create_backbone(name, num_classes=1000).eval()
        theirs = factory(weights=None, num_classes=1000).eval()
        assert count_parameters(ours) == count_parameters(theirs)
        assert round(count_parameters(ours) / 1e6, 2) == alone
        assert all(isinstance(block, torchvision.models.resnet.BasicBlock) for stage in ours.stages[1:] for block in stage)
        # same tensors in the same order: torchvision's weights (e.g. pretrained ones) load one to one
        mapped = dict(zip(ours.state_dict(), theirs.state_dict().values(), strict=True))
        ours.load_state_dict(mapped)
        x = _input(name)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x))
        peers = PeerNetwork.from_backbone(name, num_peers=4, topology="shared_trunk", num_classes=1000)
        assert round(count_parameters(peers) / 1e6, 2) == four
        assert len(peers.trunk) == 3  # stem, layer1, layer2


def test_vgg16_four_shared_trunk_peers_count():
    peers = PeerNetwork.from_backbone("vgg16", num_peers=4, topology="shared_trunk")
    assert round(count_parameters(peers) / 1e6, 2) == 53.88  # method.md §2 (two decimals)


def test_mcl_two_independent_networks_counts():
    # winycg/MCL builds N = 2 as two independent networks (method.md §9.4).
    peers = PeerNetwork.from_backbone("shufflenetv2_1_0", num_peers=2, topology="independent")
    assert round(count_parameters(peers) / 1e6, 3) == 2.712


@pytest.mark.parametrize("name", NEW_CIFAR + IMAGENET)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_forward_backward_and_the_deployed_peer_is_the_plain_backbone(name, topology):
    torch.manual_seed(0)
    peers = PeerNetwork.from_backbone(name, num_peers=2, topology=topology, num_classes=10)
    x = _input(name, batch=4)
    out = peers(x)
    assert out.logits.shape == (2, 4, 10) and out.features.shape == (2, 4, peers.feature_dim)
    out.logits.sum().backward()
    missing = [n for n, p in peers.named_parameters() if p.grad is None]
    assert not missing, missing[:5]  # every parameter, trunk and both branches, gets a gradient
    assert all(torch.isfinite(p.grad).all() for p in peers.parameters())

    peers.eval()  # the forward above moved BN running statistics: the deployed peer must carry them
    with torch.no_grad():
        logits = peers(x).logits
        plain = count_parameters(create_backbone(name, num_classes=10))
        for i in range(2):
            deployed = peers.export_peer(i).eval()
            assert isinstance(deployed, StagedBackbone) and count_parameters(deployed) == plain
            torch.testing.assert_close(deployed(x), logits[i])
            create_backbone(name, num_classes=10).load_state_dict(deployed.state_dict())


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_imagenet_resnet_peers_train_a_step_with_each_method(topology):
    """The methods see only (logits, features): 512-d features and 1000 classes at ImageNet's layout."""
    from mcl_lightning.methods import MCLOKD, Independent

    torch.manual_seed(0)
    labels_all = torch.arange(200) % 1000  # a stand-in training set: 200 samples, 200 classes
    for method_cls, options in ((MCLOKD, {"nce_k": 32, "tau": 0.07}), (Independent, {})):
        peers = PeerNetwork.from_backbone("resnet18", num_peers=2, topology=topology, num_classes=1000)
        method = method_cls(**options)
        method.attach(peers.spec())
        method.setup_data(labels_all)
        indices = torch.tensor([0, 7, 42, 199])
        losses = method(peers(_input("resnet18", batch=4)), labels_all[indices], indices)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
        assert all(p.grad is not None for p in peers.parameters())


@torch.no_grad()
def test_initialisation_follows_each_reference():
    torch.manual_seed(0)
    vgg = create_backbone("vgg16")
    assert abs(float(vgg.classifier.weight.std()) - 0.01) < 0.001 and not vgg.classifier.bias.any()
    conv = vgg.stages[3][0]  # 3x3, 256 -> 512: Kaiming-normal fan_out (fan_in would be 2x larger), bias 0
    assert conv.weight.shape == (512, 256, 3, 3)
    assert abs(float(conv.weight.std()) / math.sqrt(2 / (512 * 9)) - 1) < 0.1
    assert not conv.bias.any()

    dense = create_backbone("densenet40_12")
    conv = dense.stages[2][0][0].layers[5]  # 3x3, 48 -> 12: Kaiming-normal fan_in (fan_out would be 2x larger)
    assert conv.weight.shape == (12, 48, 3, 3)
    assert abs(float(conv.weight.std()) / math.sqrt(2 / (48 * 9)) - 1) < 0.1
    assert not dense.classifier.bias.any()

    hcg = create_backbone("hcgnet_a1")  # PyTorch defaults: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    conv = hcg.stages[1][1].squeeze[0][2]  # transition1's 1x1 conv, 120 -> 90
    assert conv.weight.shape == (90, 120, 1, 1)
    assert abs(float(conv.weight.std()) / math.sqrt(1 / (3 * 120)) - 1) < 0.1
    assert hcg.classifier.bias.abs().max() > 0  # default Linear init, not zeroed

    shuffle = create_backbone("shufflenetv2_1_0")  # PyTorch defaults as well
    conv = shuffle.stages[4][0]  # 1x1, 464 -> 1024
    assert abs(float(conv.weight.std()) / math.sqrt(1 / (3 * 464)) - 1) < 0.1


# about 8-18 s each on 2 CPU cores: one in the default suite, the rest in make test-all (each composes and
# builds in test_train.py, and its counts and shapes are checked above)
@pytest.mark.parametrize("backbone", [b if b == "densenet40_12" else pytest.param(b, marks=pytest.mark.slow) for b in NEW_CIFAR])
def test_tiny_mcl_okd_cli_run_on_real_cifar100(backbone, tmp_path, data_root):
    """One tiny real-CIFAR-100 MCL-OKD run through the CLI per backbone added for the paper tables."""
    run_dir = tmp_path / "run"
    proc = run_train(f"backbone={backbone}", "peers=2", "method=mcl_okd", "method.nce_k=256", f"data.root={data_root}",
                     f"hydra.run.dir={run_dir}", *TINY, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                     "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "data.batch_size=16",
                     "data.eval_batch_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "mcl_okd" and results["backbone"] == backbone and results["peers"] == 2
    assert results["topology"] == "shared_trunk" and results["epochs_run"] == 1
    assert 0.0 <= results["test"]["ensemble"]["top1"] <= 1.0
    deployed = export_peer(results["checkpoints"]["last"], peer=1)  # the peer MCL-OKD distils into
    assert isinstance(deployed, StagedBackbone)
    assert count_parameters(deployed) == count_parameters(create_backbone(backbone, num_classes=100))
