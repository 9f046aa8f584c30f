"""The data contract: CIFAR and ImageNet are two implementations, docs/guide/data.md's own dataset a third."""

from __future__ import annotations

import subprocess
import sys

from mcl_lightning.data import CIFARDataModule, ImageNetDataModule, OKDData, OKDDataModule

from conftest import doc_block


def test_both_datamodules_implement_the_contract(data_root):
    for dm in (CIFARDataModule(root=data_root, batch_size=32),
               ImageNetDataModule(root=data_root / "imagenette-mini", batch_size=32, num_workers=0)):
        assert isinstance(dm, OKDDataModule) and dm.num_classes in (100, 10)  # known before setup
        dm.prepare_data()
        dm.setup("fit")
        assert isinstance(dm, OKDData)
        assert dm.batch_size == 32 and dm.selection_note == "test-selected"
        assert dm.train_labels.dtype.is_signed and len(dm.train_labels) == dm.num_train_samples
        images, labels, indices = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
        assert images.is_floating_point() and images.dim() == 4
        assert labels.tolist() == dm.val_dataset.labels[indices].tolist()


def test_custom_dataset_example_trains(tmp_path):
    """docs/guide/data.md's own dataset, trained for two steps."""
    code = doc_block("custom-data", "python")
    assert code.count("L.Trainer(max_epochs=300)") == 1
    fast = ("L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator='cpu', "
            f"default_root_dir={str(tmp_path)!r}, enable_progress_bar=False, logger=False)")
    code = code.replace("L.Trainer(max_epochs=300)", fast)
    code += "\nassert trainer.global_step == 2 and data.num_classes == 10\nprint('custom data ok')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom data ok" in proc.stdout
