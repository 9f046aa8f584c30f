"""The batch contract under a plain Lightning Trainer and your own DataModule: ``(images, labels)`` batches
train every method that needs no dataset index, a memory-bank method refuses them in one line naming
``WithIndex``, ``trainer.predict`` gives each peer's and the ensemble's logits, and ``from_modules`` takes a
Sequential classifier head (torchvision's MobileNet) or refuses a head without a linear layer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from mcl_lightning import MCLOKD, ConfigError, OKDSystem, PeerNetwork
from mcl_lightning.data import WithIndex
from mcl_lightning.methods import DML

CLASSES = 10


class PairData(L.LightningDataModule):
    """Random 32x32 images as ``(images, labels)`` batches, or ``(images, labels, indices)`` with_index."""

    def __init__(self, with_index: bool = False, size: int = 48) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(size, 3, 32, 32, generator=generator)
        labels = torch.arange(size) % CLASSES
        self.dataset = TensorDataset(images, labels)
        self.with_index = with_index
        if with_index:
            self.train_labels = WithIndex(self.dataset).labels

    def train_dataloader(self) -> DataLoader:
        return DataLoader(WithIndex(self.dataset) if self.with_index else self.dataset, batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=16)

    test_dataloader = predict_dataloader = val_dataloader


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def test_pairs_train_validate_test_and_predict_with_standard_callbacks(tmp_path):
    peers = PeerNetwork.from_backbone("resnet8", num_peers=2, num_classes=CLASSES)
    system = OKDSystem(peers, DML())
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/best_peer/top1", mode="max")
    run = L.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path), enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[best, LearningRateMonitor("epoch"),
                                                           EarlyStopping("val/best_peer/top1", mode="max", patience=5)])
    run.fit(system, datamodule=PairData())
    assert run.global_step == 6 and 0.0 <= system.val_history[-1]["ensemble/top1"] <= 1.0
    reloaded = OKDSystem.from_checkpoint(best.best_model_path)  # peers and method from the checkpoint alone
    assert type(reloaded.method) is DML and len(reloaded.val_history) >= 1
    run.test(system, datamodule=PairData(), verbose=False)
    assert "best_peer/top1" in system.test_results
    batches = run.predict(system, datamodule=PairData())
    assert len(batches) == 3
    first = batches[0]
    assert first["peers"].shape == (2, 16, CLASSES) and first["ensemble"].shape == (16, CLASSES)
    system.eval()
    with torch.no_grad():  # the ensemble is the method's: DML's mean of the peers' logits
        torch.testing.assert_close(first["ensemble"], first["peers"].mean(0))


def test_a_memory_bank_method_refuses_pairs_and_trains_with_index(tmp_path):
    peers = PeerNetwork.from_backbone("resnet8", num_peers=2, num_classes=CLASSES)
    data = PairData()
    data.train_labels = WithIndex(data.dataset).labels  # the labels alone are not enough: the bank rows need the index
    with pytest.raises(ConfigError, match=r"method 'mcl_okd' needs each training sample's dataset index .* "
                                          r"mcl_lightning\.data\.WithIndex\(dataset\)"):
        trainer(tmp_path).fit(OKDSystem(peers, MCLOKD(nce_k=8, projection_dim=8)), datamodule=data)
    peers = PeerNetwork.from_backbone("resnet8", num_peers=2, num_classes=CLASSES)
    run = trainer(tmp_path)
    run.fit(OKDSystem(peers, MCLOKD(nce_k=8, projection_dim=8)), datamodule=PairData(with_index=True))
    assert run.global_step == 3


def test_with_index_adds_the_index_and_reads_the_labels():
    labels = torch.tensor([3, 1, 2])
    wrapped = WithIndex(TensorDataset(torch.zeros(3, 1), labels))
    assert len(wrapped) == 3 and wrapped[2][1:] == (labels[2], 2)
    assert torch.equal(wrapped.labels, labels)  # read item by item: TensorDataset has no targets
    with pytest.raises(TypeError, match=r"WithIndex needs a dataset of \(image, label\) samples"):
        WithIndex([torch.zeros(1)])[0]


def test_from_modules_takes_a_sequential_classifier_head(tmp_path):
    nets = [torchvision.models.mobilenet_v3_small(num_classes=CLASSES) for _ in range(2)]
    peers = PeerNetwork.from_modules(nets, classifier="classifier")  # Sequential(Linear 576->1024, ..., Linear)
    spec = peers.spec()
    assert (spec.num_classes, spec.feature_dims) == (CLASSES, (576, 576))
    run = trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)  # the sanity check included
    system = OKDSystem(peers, DML())
    run.fit(system, datamodule=PairData())
    assert "best_peer/top1" in system.val_history[-1]
    deployed = peers.export_peer(0).eval()
    images = torch.randn(2, 3, 32, 32)
    peers.eval()
    torch.testing.assert_close(deployed(images), peers(images).logits[0])


def test_from_modules_refuses_a_head_without_a_linear_layer():
    net = torchvision.models.squeezenet1_1(num_classes=CLASSES)  # its classifier is a 1x1 convolution
    with pytest.raises(ConfigError, match=r"SqueezeNet.classifier \(Sequential\) holds no nn.Linear.*classifier="):
        PeerNetwork.from_modules([net], classifier="classifier")
