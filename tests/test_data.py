"""CIFAR data layer: decoding the real copy, integrity/missing-file errors, splits, loaders, augmentation."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mcl_lightning.data.cifar as cifar_mod
from mcl_lightning.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFARDataModule,
    normalize,
    random_crop_flip,
    stratified_split,
)
from mcl_lightning.core.errors import ConfigError, DatasetIntegrityError, DatasetNotFoundError


@pytest.fixture(scope="module")
def dm(data_root: Path) -> CIFARDataModule:
    """The real CIFAR-100 copy, decoded once for the module (md5 checks on).

    `data_root` (conftest.py): MCL_DATA_ROOT, else ../shared/data; skips when neither has the copy.
    """
    module = CIFARDataModule(root=data_root, check_integrity=True, batch_size=500)
    module.prepare_data()
    module.setup("fit")
    return module


@pytest.fixture(scope="module")
def dm_holdout(data_root: Path) -> CIFARDataModule:
    module = CIFARDataModule(root=data_root, val_split=5000, split_seed=0)
    module.setup("fit")
    return module


def _write_fake(root: Path, dataset: str = "cifar100", n_train: int = 200, n_test: int = 100) -> None:
    """A small dataset in torchvision's layout (load it with check_integrity=False)."""
    classes = 100 if dataset == "cifar100" else 10
    folder = root / ("cifar-100-python" if dataset == "cifar100" else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = "fine_labels" if dataset == "cifar100" else "labels"

    def dump(name: str, n: int) -> None:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: [i % classes for i in range(n)]}, f)

    if dataset == "cifar100":
        dump("train", n_train), dump("test", n_test)
        names = {"fine_label_names": [f"c{i}" for i in range(classes)]}
        meta = "meta"
    else:
        for i in range(1, 6):
            dump(f"data_batch_{i}", n_train // 5)
        dump("test_batch", n_test)
        names, meta = {"label_names": [f"c{i}" for i in range(classes)]}, "batches.meta"
    with open(folder / meta, "wb") as f:
        pickle.dump(names, f)


def _link_copy(data_root: Path, tmp: Path, replace: str, content: bytes) -> Path:
    """A cifar-100-python folder with symlinks to the real files, except `replace` written as given."""
    folder = tmp / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        if name == replace:
            (folder / name).write_bytes(content)
        else:
            (folder / name).symlink_to(data_root / "cifar-100-python" / name)
    return tmp


# ---- the real copy --------------------------------------------------------------------------
def test_real_cifar100_contents(dm: CIFARDataModule) -> None:
    train, test = dm.train_dataset, dm.test_dataset
    assert train.images.shape == (50_000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (10_000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert torch.equal(torch.bincount(train.labels, minlength=100), torch.full((100,), 500))
    assert torch.equal(torch.bincount(test.labels, minlength=100), torch.full((100,), 100))
    sums = train.images.numpy().sum(axis=(0, 2, 3), dtype=np.int64)  # exact, and fast in numpy
    means = torch.from_numpy(sums).double() / (50_000 * 32 * 32 * 255)
    assert torch.allclose(means, torch.tensor([0.5071, 0.4865, 0.4409], dtype=torch.float64), atol=1e-3)
    assert dm.num_train_samples == 50_000 and torch.equal(dm.train_labels, train.labels)
    assert len(dm.classes) == 100 and dm.classes[0] == "apple"
    # Validation = the test set by default (as the reference and the published tables).
    assert dm.val_dataset is dm.test_dataset
    assert dm.validation_source == "test" and dm.selection_note == "test-selected"


def test_train_loader_epoch(dm: CIFARDataModule) -> None:
    seen = torch.zeros(dm.num_train_samples, dtype=torch.long)
    loader = dm.train_dataloader()
    for images, labels, indices in loader:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and indices.dtype == torch.int64
        assert torch.equal(images, dm.train_dataset.images[indices])
        assert torch.equal(labels, dm.train_labels[indices])
        seen[indices] += 1
    assert torch.all(seen == 1)  # shuffled, every sample exactly once (no drop_last)
    first = next(iter(loader))[2]
    assert not torch.equal(first, torch.arange(len(first)))
    images, labels, indices = next(iter(dm.val_dataloader()))
    assert images.shape == (256, 3, 32, 32) and torch.equal(indices, torch.arange(256))
    assert torch.equal(images, dm.test_dataset.images[:256])


# ---- integrity --------------------------------------------------------------------------------
def test_truncated_file_rejected(data_root: Path, tmp_path: Path) -> None:
    raw = (data_root / "cifar-100-python" / "test").read_bytes()
    root = _link_copy(data_root, tmp_path, "test", raw[: len(raw) // 3])
    for check in (True, False):  # with or without md5 checks: a clear error, not a pickle traceback
        with pytest.raises(DatasetIntegrityError, match="test") as info:
            CIFARDataModule(root=root, check_integrity=check).setup()
        assert str(root / "cifar-100-python" / "test") in str(info.value)
    # Also wrong array sizes with md5 checks off.
    bad = tmp_path / "bad"
    _write_fake(bad)
    with open(bad / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({"data": np.zeros((10, 1000), np.uint8), "fine_labels": [0] * 10}, f)
    with pytest.raises(DatasetIntegrityError, match=r"\(N, 3072\)"):
        CIFARDataModule(root=bad, check_integrity=False).setup()


def test_corrupted_same_size_rejected(data_root: Path, tmp_path: Path) -> None:
    raw = bytearray((data_root / "cifar-100-python" / "test").read_bytes())
    for pos in range(len(raw) // 2, len(raw) // 2 + 64):  # inside the pixel bytes
        raw[pos] ^= 0xFF
    root = _link_copy(data_root, tmp_path, "test", bytes(raw))
    with pytest.raises(DatasetIntegrityError) as info:
        CIFARDataModule(root=root, check_integrity=True).setup()
    message = str(info.value)
    assert "test" in message and "f0ef6b0ae62326f3e7ffdfab6717acfc" in message
    assert "data.check_integrity=false" in message
    # A custom copy the user trusts loads with the md5 check off.
    module = CIFARDataModule(root=root, check_integrity=False)
    module.setup()
    assert module.test_dataset.images.shape == (10_000, 3, 32, 32)


def test_accepted_md5s() -> None:
    from torchvision.datasets import CIFAR10

    md5s = cifar_mod._SPECS["cifar100"].md5s
    assert "16019d7e3df5f24257cddd939b257f8d" in md5s["train"] and "0edb6f95ed32e77e76793933524424b2" in md5s["train"]
    assert "f0ef6b0ae62326f3e7ffdfab6717acfc" in md5s["test"] and "e07c7d01aa5daebda8420b8b6820aadd" in md5s["test"]
    for name, md5 in CIFAR10.train_list + CIFAR10.test_list:
        assert cifar_mod._SPECS["cifar10"].md5s[name] == {md5}


# ---- missing data / roots ---------------------------------------------------------------------
def test_missing_files_no_download(tmp_path: Path) -> None:
    module = CIFARDataModule(root=tmp_path, download=False)
    for step in (module.prepare_data, module.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            step()
        message = str(info.value)
        assert str(tmp_path / "cifar-100-python") in message and "train" in message
        assert "MCL_DATA_ROOT" in message and "data.root" in message


def test_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar_mod, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        CIFARDataModule(root=tmp_path, download=True).prepare_data()
    message = str(info.value)
    assert "download" in message and "failed" in message and "name resolution" in message
    assert str(tmp_path / "cifar-100-python" / "meta") in message



def test_download_success_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, download_root, filename, md5))
        _write_fake(Path(download_root))

    monkeypatch.setattr(cifar_mod, "download_and_extract_archive", fake_download)
    module = CIFARDataModule(root=tmp_path, check_integrity=False)
    module.prepare_data()
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", str(tmp_path),
                      "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")]
    module.prepare_data()  # files present now: no second download
    assert len(calls) == 1
    module.setup()
    assert module.num_train_samples == 200

def test_root_resolution(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCL_DATA_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    module = CIFARDataModule()  # constructing needs no data
    assert module.num_classes == 100
    assert module.data_dir == tmp_path / "cache" / "mcl_lightning" / "data" / "cifar-100-python"  # the default folder
    with pytest.raises(DatasetNotFoundError, match=r"data\.root.*MCL_DATA_ROOT"):
        module.setup()
    monkeypatch.setenv("MCL_DATA_ROOT", str(data_root))
    assert module.data_dir == data_root / "cifar-100-python"
    module.prepare_data()  # files present: nothing to do, no download
    monkeypatch.setenv("HOME", str(tmp_path))
    assert CIFARDataModule(root="~/data").data_dir == tmp_path / "data" / "cifar-100-python"


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="cifar10"):
        CIFARDataModule(dataset="imagenet")
    with pytest.raises(ConfigError, match="100"):
        CIFARDataModule(dataset="cifar100", num_classes=10)
    assert CIFARDataModule(dataset="cifar10", num_classes=10).num_classes == 10
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError):
            CIFARDataModule(val_split=bad)
    with pytest.raises(ConfigError):
        CIFARDataModule(batch_size=0)


def test_global_batch_size(tmp_path: Path) -> None:
    _write_fake(tmp_path)
    module = CIFARDataModule(root=tmp_path, batch_size=64, check_integrity=False)
    module.trainer = SimpleNamespace(world_size=3, training=False)
    with pytest.raises(ConfigError, match="divisible"):
        module.setup()
    module.trainer = SimpleNamespace(world_size=2, training=False)
    module.setup()
    assert module.per_device_batch_size == 32
    assert module.train_dataloader().batch_size == 32 and module.val_dataloader().batch_size == 256


def test_fake_cifar10_and_fraction_split(tmp_path: Path) -> None:
    _write_fake(tmp_path, "cifar10", n_train=200, n_test=50)
    module = CIFARDataModule(root=tmp_path, dataset="cifar10", check_integrity=False, val_split=0.25,
                             batch_size=32, drop_last=True)
    module.setup()
    assert module.num_train_samples == 150 and len(module.val_dataset) == 50
    assert torch.equal(torch.bincount(module.val_dataset.labels), torch.full((10,), 5))
    assert len(module.test_dataloader().dataset) == 50
    assert sum(len(b[2]) for b in module.train_dataloader()) == 128  # drop_last
    assert module.mean == (0.4914, 0.4822, 0.4465)



def test_worker_processes(tmp_path: Path) -> None:
    _write_fake(tmp_path)
    module = CIFARDataModule(root=tmp_path, check_integrity=False, batch_size=50, num_workers=2)
    module.setup()
    loader = module.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    indices = torch.cat([batch[2] for batch in loader])
    assert torch.equal(indices.sort().values, torch.arange(200))
    # Stop the persistent workers now: left to a later garbage collection, torch's shutdown can
    # stall ~5 s per worker (Lightning shuts them down itself at the end of a loop).
    loader._iterator._shutdown_workers()

# ---- holdout split ----------------------------------------------------------------------------
def test_holdout_split(dm: CIFARDataModule, dm_holdout: CIFARDataModule) -> None:
    full_images, full_labels = dm.train_dataset.images, dm.train_labels
    assert dm_holdout.num_train_samples == 45_000 and len(dm_holdout.val_dataset) == 5_000
    assert torch.equal(torch.bincount(dm_holdout.val_dataset.labels, minlength=100), torch.full((100,), 50))
    assert dm_holdout.validation_source == "holdout" and dm_holdout.selection_note == "holdout-selected"
    train_idx, val_idx = stratified_split(full_labels, 5000, seed=0)
    assert len(set(train_idx.tolist()) | set(val_idx.tolist())) == 50_000  # disjoint and complete
    assert torch.equal(dm_holdout.train_labels, full_labels[train_idx])
    assert torch.equal(dm_holdout.val_dataset.images, full_images[val_idx])
    assert torch.equal(dm_holdout.train_dataset.images[:100], full_images[train_idx[:100]])
    # Same seed: same split; another seed: another split. The test set is untouched.
    assert torch.equal(stratified_split(full_labels, 5000, seed=0)[1], val_idx)
    assert not torch.equal(stratified_split(full_labels, 5000, seed=1)[1], val_idx)
    assert torch.equal(dm_holdout.test_dataset.images, dm.test_dataset.images)
    indices = next(iter(dm_holdout.train_dataloader()))[2]
    assert int(indices.max()) < 45_000


# ---- augmentation -----------------------------------------------------------------------------
def _coordinate_images(n: int) -> torch.Tensor:
    """Channel 0 = row + 1, channel 1 = column + 1: a crop's pixels reveal its offset and flip."""
    rows = torch.arange(1, 33).view(32, 1).expand(32, 32)
    image = torch.stack([rows, rows.t(), torch.full((32, 32), 255)]).to(torch.uint8)
    return image.expand(n, 3, 32, 32).contiguous()


def _params_from_coordinates(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    centre_row, centre_col = out[:, 0, 16, 16].long(), out[:, 1, 16, 16].long()
    flipped = out[:, 1, 16, 17].long() < centre_col
    top = centre_row - 1 + 4 - 16
    left = torch.where(flipped, centre_col - 1 + 4 - 15, centre_col - 1 + 4 - 16)
    return top, left, flipped


def _naive(image: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    padded = torch.zeros(3, 40, 40, dtype=image.dtype)
    padded[:, 4:36, 4:36] = image
    crop = padded[:, top : top + 32, left : left + 32]
    return crop.flip(-1) if flip else crop


def test_random_crop_flip_matches_naive(dm: CIFARDataModule) -> None:
    images = dm.train_dataset.images[:16]
    out = random_crop_flip(images, generator=torch.Generator().manual_seed(123))
    assert out.shape == images.shape and out.dtype == torch.uint8
    # The same generator state gives the same parameters whatever the content.
    coords = random_crop_flip(_coordinate_images(16), generator=torch.Generator().manual_seed(123))
    top, left, flipped = _params_from_coordinates(coords)
    for i in range(16):
        expected = _naive(images[i], int(top[i]), int(left[i]), bool(flipped[i]))
        assert torch.equal(out[i], expected), i
        assert torch.equal(coords[i], _naive(_coordinate_images(1)[0], int(top[i]), int(left[i]), bool(flipped[i])))


def test_random_crop_flip_distribution_and_seed() -> None:
    torch.manual_seed(0)
    out = random_crop_flip(_coordinate_images(4000))
    top, left, flipped = _params_from_coordinates(out)
    for offsets in (top, left):  # uniform over 0..8, as RandomCrop(32, padding=4)
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and counts.min() > 300
    assert 0.45 < flipped.float().mean() < 0.55
    torch.manual_seed(0)
    assert torch.equal(random_crop_flip(_coordinate_images(4000)), out)  # default RNG is reproducible
    assert torch.equal(random_crop_flip(_coordinate_images(8), padding=0)[:, :2].sort(-1).values,
                       _coordinate_images(8)[:, :2])  # padding 0: only flips


def test_normalize() -> None:
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    for c, value in enumerate((0, 128, 255)):
        images[:, c] = value
    out = normalize(images, CIFAR100_MEAN, CIFAR100_STD)
    assert out.dtype == torch.float32 and out.shape == images.shape
    for c, value in enumerate((0, 128, 255)):
        expected = (value / 255 - CIFAR100_MEAN[c]) / CIFAR100_STD[c]
        assert torch.allclose(out[:, c], torch.tensor(expected, dtype=torch.float32))


def test_on_after_batch_transfer(tmp_path: Path) -> None:
    _write_fake(tmp_path)
    module = CIFARDataModule(root=tmp_path, check_integrity=False, batch_size=16)
    module.setup()
    batch = next(iter(module.train_dataloader()))
    images, labels, indices = module.on_after_batch_transfer(batch, 0)  # no trainer: normalise only
    assert images.dtype == torch.float32 and torch.equal(labels, batch[1]) and torch.equal(indices, batch[2])
    assert torch.equal(images, normalize(batch[0], CIFAR100_MEAN, CIFAR100_STD))
    module.trainer = SimpleNamespace(training=False, world_size=1)
    assert torch.equal(module.on_after_batch_transfer(batch, 0)[0], images)
    module.trainer = SimpleNamespace(training=True, world_size=1)
    augmented = module.on_after_batch_transfer(batch, 0)[0]
    assert augmented.shape == images.shape and augmented.dtype == torch.float32
    assert not torch.equal(augmented, images)


def test_lightning_trainer_integration(tmp_path: Path) -> None:
    """Under a real Trainer: training batches are augmented, validation batches only normalised."""
    import lightning

    _write_fake(tmp_path)
    module = CIFARDataModule(root=tmp_path, check_integrity=False, batch_size=20)

    class Probe(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3 * 32 * 32, 100)
            self.seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(("train", batch[0], batch[2]))
            return torch.nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

        def validation_step(self, batch, batch_idx):
            self.seen.append(("val", batch[0], batch[2]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = lightning.Trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, val_check_interval=2)
    lightning.seed_everything(0)
    trainer.fit(probe, datamodule=module)
    stages = [s for s, _, _ in probe.seen]
    assert stages.count("train") == 2 and "val" in stages
    for stage, images, indices in probe.seen:
        source = module.train_dataset if stage == "train" else module.test_dataset
        plain = normalize(source.images[indices], CIFAR100_MEAN, CIFAR100_STD)
        assert images.dtype == torch.float32
        assert torch.equal(images, plain) == (stage == "val")


@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_hydra_configs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / f"{name}.yaml")
    params = inspect.signature(CIFARDataModule.__init__).parameters
    assert set(cfg.keys()) == {"_target_"} | (set(params) - {"self"})  # every constructor arg, nothing else
    for key, param in params.items():
        if key not in ("self", "root", "num_classes", "dataset"):
            assert cfg[key] == param.default, key
    monkeypatch.setenv("MCL_DATA_ROOT", str(tmp_path))
    module = instantiate(cfg)
    assert module.dataset == name and module.num_classes == cfg.num_classes
    assert module.data_dir.parent == tmp_path and module.batch_size == 64
    monkeypatch.delenv("MCL_DATA_ROOT")
    assert instantiate(cfg).root is None
