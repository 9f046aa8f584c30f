"""Class folders on disk (torchvision's ImageFolder layout): finding the root and its ``train/`` and
``val/`` splits, choosing classes, indexing the files, checking and decoding images.

Everything that can be wrong with the folders is one message naming what and where, raised before
any training (see ``mcl_lightning.data.imagenet`` for the DataModule that uses this).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from mcl_lightning.core.errors import ConfigError, DatasetIntegrityError, DatasetNotFoundError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ROOT_ENV = "MCL_IMAGENET_ROOT"
VERIFY_MODES = ("header", "decode", "none")
_SHOWN = 5  # problems listed in a message before "... and N more"


# ---- folders --------------------------------------------------------------------------------------
def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` (or ``$MCL_IMAGENET_ROOT``) as a folder that exists, else a DatasetNotFoundError."""
    value = os.fspath(root) if root is not None else os.environ.get(ROOT_ENV) or None
    layout = "it must contain train/<class>/*.JPEG and val/<class>/*.JPEG (torchvision's ImageFolder layout)"
    if value is None:
        raise DatasetNotFoundError(f"No data root set for ImageNet. Pass data.root=/path/to/imagenet or "
                                   f"`export {ROOT_ENV}=/path/to/imagenet`; {layout}.")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"The ImageNet root {path} does not exist (data.root={value}); {layout}.")
    return path


def split_dirs(root: Path) -> tuple[Path, Path]:
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"{' and '.join(str(root / m) for m in missing)} missing: an ImageNet root needs train/ and val/, "
            f"each with one folder per class (torchvision's ImageFolder layout). Point data.root at the folder "
            f"that holds them.")
    return root / "train", root / "val"


def find_classes(split_dir: Path) -> list[str]:
    """Sorted names of the class folders of ``split_dir``."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def select_classes(available: list[str], classes: Any, where: Path) -> list[str]:
    """The classes to use, sorted: all, the first n, a list of names, or the names in a text file."""
    if classes is None:
        return available
    if isinstance(classes, bool):
        raise ConfigError(f"data.classes must be null, a count, a list of class names or a file, got {classes!r}.")
    if isinstance(classes, int):
        if not 1 <= classes <= len(available):
            raise ConfigError(f"data.classes={classes} but {where} has {len(available)} class folders; "
                              f"pick 1 to {len(available)}.")
        return available[:classes]
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.classes={classes} is neither a count, a list, nor a file of class names.")
        names = [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    else:
        names = [str(name) for name in classes]
    if not names:
        raise ConfigError("data.classes is empty; give null (all classes), a count or class names.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"data.classes lists {listing(duplicates)} more than once.")
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ConfigError(f"data.classes names {len(unknown)} class(es) with no folder in {where}: {listing(unknown)}.")
    return sorted(names)


def count_classes(root: str | None, classes: Any = None) -> int:
    """Number of classes a run on ``root`` uses (config resolver ``mcl.num_classes``): no images read."""
    if isinstance(classes, int) and not isinstance(classes, bool):
        return classes
    if classes is not None and not isinstance(classes, (str, os.PathLike)):
        return len(list(classes))
    train_dir, _ = split_dirs(resolve_root(root))
    return len(select_classes(find_classes(train_dir), classes, train_dir))


def _num_classes_resolver(root: Any, classes: Any = None) -> int:
    if classes is not None and OmegaConf.is_config(classes):
        classes = OmegaConf.to_container(classes)
    return count_classes(root, classes)


# `num_classes: ${mcl.num_classes:${.root},${.classes}}` in conf/data/imagenet.yaml: the model is
# built from the class count before the DataModule is set up.
if not OmegaConf.has_resolver("mcl.num_classes"):
    OmegaConf.register_new_resolver("mcl.num_classes", _num_classes_resolver)


def list_images(class_dir: Path) -> list[str]:
    """Sorted image file names (by extension, case-insensitive) of one class folder."""
    return sorted(e.name for e in os.scandir(class_dir) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))


@dataclass
class FolderIndex:
    """Files of one split: paths relative to the split folder (a NumPy bytes array: no per-object
    refcounts for forked workers to copy) and int64 labels."""

    folder: Path
    paths: np.ndarray
    labels: Tensor

    def path(self, index: int) -> Path:
        return self.folder / self.paths[index].decode()

    def subset(self, indices: Tensor) -> "FolderIndex":
        idx = indices.numpy()
        return FolderIndex(self.folder, self.paths[idx], self.labels[indices])


def index_split(split_dir: Path, classes: list[str]) -> FolderIndex:
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        files = list_images(split_dir / name)
        if not files:
            empty.append(str(split_dir / name))
        paths.extend(f"{name}/{f}" for f in files)
        labels.extend([label] * len(files))
    if empty:
        raise DatasetIntegrityError(
            f"{len(empty)} class folder(s) hold no images ({', '.join(IMG_EXTENSIONS)}): {listing(empty)}. "
            f"Put the class's images there or remove the folder (from train/ and val/ alike).")
    return FolderIndex(split_dir, np.array(paths, dtype=np.bytes_), torch.tensor(labels, dtype=torch.long))


# ---- decoding -------------------------------------------------------------------------------------
def read_encoded(path: Path) -> Tensor:
    try:
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError as exc:
        raise DatasetIntegrityError(f"Cannot read the image {path}: {exc}.") from exc


def decode_file(path: Path, data: Tensor | None = None) -> Tensor:
    """(3, H, W) uint8 RGB from an image file; a DatasetIntegrityError naming the file otherwise."""
    data = read_encoded(path) if data is None else data
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise DatasetIntegrityError(f"Cannot decode the image {path}: {exc}. Replace or remove the file.") from exc


def _check_header(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
        if width < 1 or height < 1:
            return "empty image"
    except Exception as exc:  # PIL raises many types for unreadable files
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_decode(path: Path) -> str | None:
    try:
        decode_file(path)
    except DatasetIntegrityError as exc:
        return str(exc.__cause__ or exc)
    return None


def verify_images(paths: list[Path], mode: str, threads: int = 8) -> None:
    """Open every image (``header``: PIL reads the header; ``decode``: full decode); one message
    naming the unreadable files."""
    if mode == "none" or not paths:
        return
    check = _check_header if mode == "header" else _check_decode
    chunks = [paths[i:i + 1024] for i in range(0, len(paths), 1024)]

    def run(chunk: list[Path]) -> list[tuple[Path, str]]:
        return [(p, why) for p in chunk if (why := check(p)) is not None]

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        bad = [item for found in pool.map(run, chunks) for item in found]
    if bad:
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:_SHOWN])
        more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise DatasetIntegrityError(
            f"{len(bad)} unreadable image(s): {shown}{more}. Replace or remove them "
            f"(data.verify_images=none skips this check for a copy you trust).")
