"""Where an entry point will write, checked before it does any work: a results file that can only be
written at the end (after an evaluation or a benchmark) must not fail then, and must never replace a
checkpoint or a training run's results.json.
"""

from __future__ import annotations

from pathlib import Path

from mcl_lightning.core.errors import ConfigError

# files an output must never replace: the checkpoints and the results a run is read back from
PROTECTED_NAMES = ("results.json",)
PROTECTED_SUFFIXES = (".ckpt",)


def check_output_file(path: str | Path, option: str, inputs: tuple[str | Path, ...] = (),
                      create_parent: bool = True) -> Path:
    """``path`` as a file to write: not a folder, not one of ``inputs``, not a checkpoint or a run's
    results.json, in a folder that exists (created when ``create_parent``). ``option`` names the
    command-line option in the message. Returns the path."""
    path = Path(path).expanduser()
    if str(path) in ("", "."):
        raise ConfigError(f"{option} is empty; pass a file name")
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; pass a file name, e.g. {path / 'out'}")
    resolved = path.resolve()
    if any(resolved == Path(p).expanduser().resolve() for p in inputs):
        raise ConfigError(f"{option} {path} is the input it reads; pass another file name")
    if path.exists() and (path.name in PROTECTED_NAMES or path.suffix in PROTECTED_SUFFIXES):
        raise ConfigError(f"{option} {path} would replace a checkpoint or a run's results; pass another file name")
    check_output_folder(path.parent, option, create=create_parent)
    return path


def check_no_file_in_the_way(folder: str | Path, option: str, fix: str = "pass a path in a folder") -> Path:
    """``folder`` (existing or not) with no file at it or at any of its parents, which would make the
    ``mkdir`` that creates it fail; nothing is created. ``fix`` ends the message."""
    folder = Path(folder).expanduser()
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option}: {parent} is a file, not a folder; {fix}")
            break
    return folder


def check_output_folder(folder: str | Path, option: str, create: bool = True) -> Path:
    """``folder`` as a place to write into: no file in its way; created when ``create``."""
    folder = check_no_file_in_the_way(folder, option)
    if not folder.is_dir():
        if not create:
            raise ConfigError(f"{option}: the folder {folder} does not exist; create it first")
        folder.mkdir(parents=True, exist_ok=True)
    return folder
