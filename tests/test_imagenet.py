"""The ImageNet path: the DataModule on the real imagenette-mini copy (counts, transforms, workers,
device decoding, class subsets), a clear message for every bad input, and CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms.v2 as T
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, read_file

from mcl_lightning.data import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataModule, normalize, sample_key, sample_keys
from mcl_lightning.data.augment import random_resized_crop_box, resized_crop_flip
from mcl_lightning.core.errors import ConfigError, DatasetIntegrityError, DatasetNotFoundError
from mcl_lightning.export import export_program, image_size_of


@pytest.fixture(scope="session")
def imagenette(data_root: Path) -> Path:
    root = data_root / "imagenette-mini"
    if not (root / "train").is_dir():
        pytest.fail(f"{root} is missing: the shared data has imagenette-mini beside cifar-100-python")
    return root


def module(root: Path, **kwargs) -> ImageNetDataModule:
    dm = ImageNetDataModule(root=root, **{"num_workers": 0, "batch_size": 20, "eval_batch_size": 25, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def training(dm: ImageNetDataModule, epoch: int = 0) -> ImageNetDataModule:
    dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, world_size=1, global_rank=0)
    return dm


# ---- the real copy ----------------------------------------------------------------------------------
def test_counts_classes_and_batches(imagenette):
    dm = module(imagenette)
    assert dm.num_classes == 10 and len(dm.classes) == 10 and dm.classes == sorted(dm.classes)
    assert dm.classes[0] == "n01440764"
    assert dm.num_train_samples == 1000 and len(dm.val_dataset) == 500 and dm.test_dataset is dm.val_dataset
    assert torch.equal(torch.bincount(dm.train_labels), torch.full((10,), 100))
    assert torch.equal(torch.bincount(dm.val_dataset.labels), torch.full((10,), 50))
    assert dm.selection_note == "test-selected"
    images, labels, indices = next(iter(dm.train_dataloader()))
    assert images.shape == (20, 3, 224, 224) and images.dtype == torch.uint8
    assert torch.equal(labels, dm.train_labels[indices]) and len(set(indices.tolist())) == 20  # the index in every batch
    images, labels, indices = next(iter(dm.val_dataloader()))
    assert images.shape == (25, 3, 224, 224) and torch.equal(indices, torch.arange(25))


def test_evaluation_transform_is_resize_256_center_crop_224(imagenette):
    dm = module(imagenette)
    images, _, indices = next(iter(dm.val_dataloader()))
    reference = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224)])
    for i in (0, 7):
        decoded = decode_image(read_file(str(dm.val_dataset.index.path(int(indices[i])))), mode=ImageReadMode.RGB)
        assert torch.equal(images[i], reference(decoded))
    out = dm.on_after_batch_transfer((images, _, indices), 0)[0]  # normalised with ImageNet mean/std
    torch.testing.assert_close(out, normalize(images, IMAGENET_MEAN, IMAGENET_STD))


def test_training_crops_are_keyed_random_resized_crops(imagenette):
    dm = training(module(imagenette, seed=5))
    dataset = dm.train_dataset
    image, label, index = dataset[(3, 0)]
    decoded = decode_image(read_file(str(dataset.index.path(3))), mode=ImageReadMode.RGB)
    assert sample_key(5, 0, 3) == int(sample_keys(5, 0, torch.tensor([3]))[0])  # scalar = batched keys
    expected = resized_crop_flip(decoded, *random_resized_crop_box(sample_key(5, 0, 3), 224, 224), 224)
    assert torch.equal(image, expected) and int(index) == 3 and int(label) == int(dm.train_labels[3])
    assert torch.equal(dataset[(3, 0)][0], image) and not torch.equal(dataset[(3, 1)][0], image)  # per epoch


def test_random_resized_crop_statistics_match_torchvision():
    """Same distribution as torchvision's RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3))."""
    n = 20_000
    for height, width in ((375, 500), (100, 900)):
        boxes = torch.tensor([random_resized_crop_box(sample_key(0, 0, i), height, width) for i in range(n)])
        top, left, h, w, flip = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        torch.manual_seed(0)
        image = torch.empty(1, height, width)
        ref = torch.tensor([T.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
        for ours, theirs in ((h * w, ref[:, 2] * ref[:, 3]), (w / h, ref[:, 3] / ref[:, 2])):
            ours, theirs = ours.double(), theirs.double()
            assert abs(ours.mean() / theirs.mean() - 1) < 0.02 and abs(ours.std() / theirs.std() - 1) < 0.03
        assert abs(flip.double().mean() - 0.5) < 0.02


def test_worker_processes_and_device_decoding_give_the_same_batches(imagenette):
    """decode=cpu (in 2 worker processes) and decode=device (here the CPU as the device) agree
    exactly: the same crops, keyed by (seed, epoch, index), and the same evaluation images."""
    in_workers = training(module(imagenette, num_workers=2, seed=1), epoch=2)
    on_device = training(module(imagenette, decode="device", seed=1), epoch=2)
    loaders = [in_workers.train_dataloader(), on_device.train_dataloader()]
    for loader in loaders:
        loader.sampler.set_epoch(2)  # what Lightning does at the start of every epoch
    (a, la, ia), raw = next(iter(loaders[0])), next(iter(loaders[1]))
    encoded, labels, indices, paths, host_indices = on_device.transfer_batch_to_device(raw, torch.device("cpu"), 0)
    assert isinstance(encoded, list) and encoded[0].dtype == torch.uint8 and encoded[0].dim() == 1
    b, lb, ib = on_device.on_after_batch_transfer((encoded, labels, indices, paths, host_indices), 0)
    assert torch.equal(ia, ib) and torch.equal(la, lb)
    torch.testing.assert_close(b, normalize(a, IMAGENET_MEAN, IMAGENET_STD))
    on_device.trainer.training = False
    raw = next(iter(on_device.val_dataloader()))
    val = on_device.on_after_batch_transfer(on_device.transfer_batch_to_device(raw, torch.device("cpu"), 0), 0)
    images, _, _ = next(iter(in_workers.val_dataloader()))
    torch.testing.assert_close(val[0], normalize(images, IMAGENET_MEAN, IMAGENET_STD))
    loaders[0]._iterator._shutdown_workers()


def test_class_subsets_and_per_class_fraction(imagenette, tmp_path):
    dm = module(imagenette, classes=3)
    assert dm.num_classes == 3 and dm.num_train_samples == 300 and len(dm.val_dataset) == 150
    picked = ["n03888257", "n02102040"]
    dm = module(imagenette, classes=picked)
    assert dm.classes == sorted(picked) and set(dm.train_labels.tolist()) == {0, 1}
    listing = tmp_path / "subset.txt"
    listing.write_text("# ImageNet-100-style class list\nn03888257\nn02102040 some description\n")
    assert module(imagenette, classes=str(listing)).classes == sorted(picked)
    dm = module(imagenette, train_fraction=0.1, split_seed=4)
    assert dm.num_train_samples == 100 and torch.equal(torch.bincount(dm.train_labels), torch.full((10,), 10))
    assert len(dm.val_dataset) == 500  # the evaluation set is never reduced
    other = module(imagenette, train_fraction=0.1, split_seed=5)
    assert list(other.train_dataset.index.paths) != list(dm.train_dataset.index.paths)
    held = module(imagenette, val_split=100)
    assert held.num_train_samples == 900 and len(held.val_dataset) == 100 and len(held.test_dataset) == 500
    assert held.selection_note == "holdout-selected"
    with pytest.raises(ConfigError, match="nope"):
        module(imagenette, classes=["n01440764", "nope"])
    with pytest.raises(ConfigError, match="data.num_classes=1000 but"):
        module(imagenette, num_classes=1000)


# ---- bad inputs ---------------------------------------------------------------------------------------
def jpeg(path: Path, height: int = 40, width: int = 60, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)).numpy().tobytes())


def fake_imagenet(root: Path, classes=("a", "b"), per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for c in classes:
            for i in range(per_class):
                jpeg(root / split / c / f"{c}_{i}.JPEG", 40 + 10 * i, 60, seed=i)
    return root


def test_missing_root_train_or_val(tmp_path, monkeypatch):
    monkeypatch.delenv("MCL_IMAGENET_ROOT", raising=False)
    with pytest.raises(DatasetNotFoundError, match=r"data\.root=.*MCL_IMAGENET_ROOT"):
        module(None)
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'nowhere'} does not exist"):
        module(tmp_path / "nowhere")
    root = fake_imagenet(tmp_path / "in")
    for split in ("val", "train"):
        (root / split).rename(root / f"{split}_moved")
        with pytest.raises(DatasetNotFoundError) as info:
            module(root)
        assert f"{root / split} missing" in str(info.value) and "train/ and val/" in str(info.value)
        (root / f"{split}_moved").rename(root / split)
    monkeypatch.setenv("MCL_IMAGENET_ROOT", str(root))
    assert module(None).num_train_samples == 6


def test_class_folder_without_images(tmp_path):
    root = fake_imagenet(tmp_path)
    for f in (root / "val" / "b").iterdir():
        f.unlink()
    (root / "val" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetIntegrityError) as info:
        module(root)
    assert f"{root / 'val' / 'b'}" in str(info.value) and "hold no images" in str(info.value)


def test_train_and_val_class_lists_differ(tmp_path):
    root = fake_imagenet(tmp_path, classes=("a", "b", "c"))
    (root / "val" / "c").rename(root / "val" / "z")
    with pytest.raises(DatasetIntegrityError) as info:
        module(root)
    message = str(info.value)
    assert "different class folders" in message and "only in train/: c" in message and "only in val/: z" in message


def test_unreadable_images_are_named_by_path(tmp_path):
    root = fake_imagenet(tmp_path)
    garbage = root / "train" / "a" / "a_1.JPEG"
    garbage.write_bytes(b"this is not a JPEG at all")
    with pytest.raises(DatasetIntegrityError) as info:
        module(root)  # prepare_data opens every header before any training
    assert str(garbage) in str(info.value) and "1 unreadable image" in str(info.value)
    # A truncated file passes the header check; verify_images=decode catches it, and so does
    # decoding it during training, with its path.
    jpeg(garbage, 200, 200)
    truncated = root / "val" / "b" / "b_2.JPEG"
    jpeg(truncated, 200, 200)
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 2])  # header intact
    dm = module(root)  # header check: fine
    with pytest.raises(DatasetIntegrityError, match=str(truncated)):
        module(root, verify_images="decode")
    position = next(i for i in range(len(dm.val_dataset)) if dm.val_dataset.index.path(i) == truncated)
    with pytest.raises(DatasetIntegrityError, match=f"Cannot decode the image {truncated}"):
        dm.val_dataset[position]


def test_config_errors():
    for kwargs, match in (({"decode": "gpu"}, "data.decode"), ({"verify_images": "yes"}, "verify_images"),
                          ({"train_fraction": 0}, "train_fraction"), ({"image_size": 300}, "resize_size"),
                          ({"classes": True}, "data.classes"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ConfigError, match=match):
            ImageNetDataModule(root="/nowhere", **kwargs)


# ---- command line -------------------------------------------------------------------------------------
def run_train(*overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mcl_lightning.train", *overrides], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bad_imagenet_roots_are_one_line_on_the_command_line(tmp_path):
    root = fake_imagenet(tmp_path / "data")
    (root / "val").rename(root / "validation")
    proc = run_train("data=imagenet", "backbone=resnet20", "peers=2", f"data.root={root}", f"hydra.run.dir={tmp_path}/a")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{root / 'val'} missing" in proc.stderr
    (root / "validation").rename(root / "val")
    bad = root / "val" / "b" / "b_0.JPEG"
    bad.write_bytes(b"")
    proc = run_train("data=imagenet", "backbone=resnet20", "peers=2", f"data.root={root}", "method.nce_k=2",
                     f"hydra.run.dir={tmp_path}/b")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(bad) in proc.stderr


TINY_IMAGENET = ["trainer.max_steps=3", "data.batch_size=16", "data.eval_batch_size=50", "data.num_workers=2",
                 "method.nce_k=64", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                 "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("decode", ["cpu", pytest.param("device", marks=pytest.mark.slow)])
def test_mcl_okd_cli_run_on_imagenette(tmp_path, imagenette, decode):
    """A 3-step MCL-OKD run with data=imagenet (resnet20 at 64 px until the ImageNet ResNets land),
    decoding in the workers or, through Lightning's batch-transfer hooks, on the device (the CPU here)."""
    run_dir = tmp_path / "run"
    proc = run_train("data=imagenet", "backbone=resnet20", "peers=2", f"data.root={imagenette}", *TINY_IMAGENET,
                     "data.image_size=64", "data.resize_size=73", f"data.decode={decode}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "mcl_okd" and results["peers"] == 2 and results["global_batch_size"] == 16
    assert results["config"]["data"]["num_classes"] == 10 and results["test"]["num_images"] == 50
    assert results["config"]["method"]["negatives_with_replacement"] is False  # the bounded sampler
    if decode == "cpu":  # the deployed peer as a torch.export program takes the run's 64 px images
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        assert image_size_of(checkpoint) == 64
        program = export_program(checkpoint).module()
        assert program(torch.zeros(3, 3, 64, 64)).shape == (3, 10)


@pytest.mark.slow  # the CLI path: test_mcl_okd_cli_run_on_imagenette[cpu] by default
def test_acceptance_command_with_resnet18(tmp_path, imagenette):
    """The issue's acceptance command verbatim: needs the ImageNet ResNet-18 of the backbones branch."""
    from mcl_lightning.models import list_backbones

    if "resnet18" not in list_backbones():
        pytest.skip("backbone resnet18 is not registered yet (it comes with the ImageNet backbones)")
    run_dir = tmp_path / "run"
    proc = run_train("data=imagenet", "backbone=resnet18", "peers=2", f"data.root={imagenette}", *TINY_IMAGENET,
                     f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["backbone"] == "resnet18" and results["test"]["num_images"] == 50
