"""timm and torchvision networks as peers from the command line (models/library.py): trained on real
data at the data set's own image size, exported as the library's own module with the trained weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import doc_commands, run_cli
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.export import export_peer, load_peers
from mcl_lightning.models import PeerNetwork, build_peers

TINY = ["data.batch_size=16", "data.eval_batch_size=16", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false"]
SMALL_MCL_OKD = ["method.nce_k=32", "method.projection_dim=16"]


def imagenette(data_root: Path) -> list[str]:
    return [f"data.root={data_root / 'imagenette-mini'}", "data.num_workers=0"]


def train_and_export(tmp_path: Path, line: int, *overrides: str) -> tuple[dict, nn.Module, PeerNetwork, Path]:
    """Command ``line`` of docs/backbones.md's timm/torchvision block, with tiny settings."""
    module, args = doc_commands("library-backbones")[line]
    run_dir = tmp_path / "run"
    proc = run_cli(module, *args, *TINY, *overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    return results, export_peer(checkpoint), load_peers(checkpoint), checkpoint


def exported_equals_trained(exported: nn.Module, peers: PeerNetwork, size: int) -> None:
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert torch.equal(exported(images), peers(images).logits[-1])


def test_timm_peers_train_on_cifar100_and_export_the_timm_module(tmp_path, data_root):
    timm = pytest.importorskip("timm", reason='backbone=timm needs pip install "mcl-lightning[timm]"')
    results, exported, peers, _ = train_and_export(tmp_path, 0, "peers=2", f"data.root={data_root}")
    assert results["backbone"] == "timm:mobilenetv3_small_050" and results["topology"] == "independent"
    assert results["method"] == "dml" and results["peers"] == 2
    assert type(exported) is type(timm.create_model("mobilenetv3_small_050")) and exported.classifier.out_features == 100
    exported_equals_trained(exported, peers, 32)  # CIFAR's own 32x32: no resize, stem unchanged


def test_torchvision_peers_train_on_imagenette_and_export_the_torchvision_module(tmp_path, data_root):
    from torchvision.models import MobileNetV3

    results, exported, peers, _ = train_and_export(tmp_path, 1, "peers=2", *SMALL_MCL_OKD, *imagenette(data_root))
    assert results["backbone"] == "torchvision:mobilenet_v3_small" and results["topology"] == "independent"
    assert results["method"] == "mcl_okd" and results["peers"] == 2
    assert type(exported) is MobileNetV3 and exported.classifier[-1].out_features == 10
    exported_equals_trained(exported, peers, 224)  # ImageNet's 224x224 crops


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cifar100", "imagenette"])
def test_mixed_library_peers_train_on_both_datasets_and_export_from_the_cli(tmp_path, data_root, dataset):
    timm = pytest.importorskip("timm", reason='timm: peers need pip install "mcl-lightning[timm]"')
    data = ["data=imagenet", *imagenette(data_root)] if dataset == "imagenette" else [f"data.root={data_root}"]
    results, exported, peers, checkpoint = train_and_export(tmp_path, 2, *SMALL_MCL_OKD, *data)
    assert results["backbone"] == "torchvision:mobilenet_v3_small+timm:mobilenetv3_small_050"
    assert type(exported) is type(timm.create_model("mobilenetv3_small_050"))
    exported_equals_trained(exported, peers, 224 if dataset == "imagenette" else 32)
    module, args = doc_commands("library-backbones")[3]
    args = [str(checkpoint) if a.endswith("last.ckpt") else str(tmp_path / a) if a == "peer.pt" else a for a in args]
    proc = run_cli(module, *args)
    assert proc.returncode == 0 and "timm.create_model('mobilenetv3_small_050'" in proc.stdout, proc.stderr[-2000:]
    exported.load_state_dict(torch.load(tmp_path / "peer.pt", weights_only=True))  # the library module takes it


def test_pretrained_loads_a_local_file_and_leaves_out_a_classifier_of_another_width(tmp_path):
    from torchvision.models import mobilenet_v3_small

    source = mobilenet_v3_small(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    peers = build_peers("mobilenet_v3_small", peers=2, num_classes=10, library="torchvision",
                        pretrained=str(tmp_path / "weights.pth"))
    deployed = peers.export_peer(0)
    assert torch.equal(deployed.features[0][0].weight, source.features[0][0].weight)
    assert deployed.classifier[-1].out_features == 10
    assert torch.equal(deployed.classifier[0].weight, source.classifier[0].weight)


def test_timm_pretrained_reads_the_file_not_the_hub(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm", reason='backbone=timm needs pip install "mcl-lightning[timm]"')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = timm.create_model("mobilenetv3_small_050", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    peers = build_peers("mobilenetv3_small_050", peers=1, num_classes=10, library="timm",
                        pretrained=str(tmp_path / "weights.pth"))
    deployed = peers.export_peer(0)
    assert torch.equal(deployed.conv_stem.weight, source.conv_stem.weight) and deployed.classifier.out_features == 10


@pytest.mark.parametrize("kwargs, message", [
    ({"library": "torchvision", "topology": "shared_trunk"}, "independent peers only"),
    ({"library": "torchvision", "branch_point": 2}, "independent peers only"),
    ({"library": "torchvision", "pretrained": "/nonexistent/weights.pth"}, "is not a file"),
    ({"pretrained": "/nonexistent/weights.pth"}, "timm: or torchvision: networks only"),
    ({"library": "torchvision", "backbone": "resnet_9000"}, "unknown torchvision classification model"),
    ({"library": "torchvision", "backbone": "squeezenet1_1"}, "no final nn.Linear"),
    ({"library": "keras"}, "unknown backbone library 'keras'"),
])
def test_refusals_are_one_line_naming_the_fix(kwargs, message):
    options = {"backbone": "mobilenet_v3_small", "peers": 2, "num_classes": 10, **kwargs}
    if "library" not in kwargs:
        options["backbone"] = "resnet8"
    with pytest.raises(ConfigError, match=message) as error:
        build_peers(**options)
    assert "\n" not in str(error.value)


def test_timm_not_installed_names_its_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r'pip install "mcl-lightning\[timm\]"'):
        build_peers("mobilenetv3_small_050", peers=2, num_classes=10, library="timm")
