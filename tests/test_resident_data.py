"""data.device_resident: batches indexed on the training device, the same batches as the DataLoader."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch

from mcl_lightning.data import CIFARDataModule, DeviceResidentLoader
from mcl_lightning.core.errors import ConfigError

from test_data import _write_fake


def _module(root: Path, **kwargs) -> CIFARDataModule:
    module = CIFARDataModule(root=root, check_integrity=False, batch_size=16, **kwargs)
    module.setup("fit")
    return module


@pytest.mark.parametrize("drop_last", [False, True])
def test_same_batches_as_the_dataloader(tmp_path: Path, drop_last: bool) -> None:
    _write_fake(tmp_path, n_train=200)
    plain = _module(tmp_path, drop_last=drop_last)
    resident = _module(tmp_path, drop_last=drop_last, device_resident=True)
    loaders = plain.train_dataloader(), resident.train_dataloader()
    assert isinstance(loaders[1], DeviceResidentLoader) and len(loaders[0]) == len(loaders[1])
    for epoch in range(2):
        runs = []
        for loader in loaders:
            torch.manual_seed(epoch)
            runs.append([tuple(t.clone() for t in batch) for batch in loader] + [torch.rand(3)])
        assert len(runs[0]) == len(runs[1]) == len(loaders[0]) + 1
        for a, b in zip(runs[0][:-1], runs[1][:-1]):
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and torch.equal(x, y)
        assert torch.equal(runs[0][-1], runs[1][-1])  # and the default RNG is left in the same state
    served = torch.cat([b[2] for b in runs[1][:-1]])
    assert len(served) == (192 if drop_last else 200) and len(set(served.tolist())) == len(served)


def test_same_augmented_batches_under_a_trainer(tmp_path: Path) -> None:
    """Three seeded training steps see identical (augmented) images, labels and indices either way."""
    _write_fake(tmp_path, n_train=200)

    class Probe(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3 * 32 * 32, 100)
            self.seen: list[tuple[torch.Tensor, ...]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(tuple(t.clone() for t in batch))
            return torch.nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []
    for resident in (False, True):
        probe = Probe()
        trainer = lightning.Trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu",
                                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False)
        lightning.seed_everything(0)
        trainer.fit(probe, datamodule=CIFARDataModule(root=tmp_path, check_integrity=False, batch_size=16,
                                                      device_resident=resident))
        seen.append(probe.seen)
    assert len(seen[0]) == len(seen[1]) == 3
    for a, b in zip(*seen):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert a[0].dtype == torch.float32  # augmented and normalised after the transfer, as before


def test_batches_need_no_host_sync() -> None:
    """On the meta device any value read back to the host raises: serving a batch reads none."""
    images = torch.empty(100, 3, 32, 32, dtype=torch.uint8, device="meta")
    labels = torch.empty(100, dtype=torch.long, device="meta")
    loader = DeviceResidentLoader(images, labels, 32, "meta", drop_last=True)
    batches = list(loader)
    assert len(batches) == 3 and all(t.device.type == "meta" for batch in batches for t in batch)
    assert batches[0][0].shape == (32, 3, 32, 32)


def test_one_device_only(tmp_path: Path) -> None:
    from types import SimpleNamespace

    _write_fake(tmp_path, n_train=200)
    module = _module(tmp_path, device_resident=True)
    module.trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(ConfigError, match="device_resident"):
        module.train_dataloader()
