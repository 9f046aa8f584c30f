"""Deploy one peer from a training checkpoint: a plain backbone, no peers, heads or banks.

    python -m mcl_lightning.export <run dir>/checkpoints/best-epoch123.ckpt --peer 3 --out resnet32.pt
    python -m mcl_lightning.export <checkpoint> --program resnet32.pt2   # a torch.export program

writes the peer's ``state_dict`` (loadable into ``create_backbone(name, num_classes)``, or for a
``timm:``/``torchvision:`` peer into the library's own network, which export gives back) and/or a
``torch.export`` program of it (``torch.export.load(path).module()(images)``: no mcl_lightning needed,
any batch size, at the run's image size), and prints what it is. From Python: ``export_peer(path, peer=3)`` returns the
``nn.Module``, ``export_program(path, peer=3)`` the ``ExportedProgram``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from mcl_lightning.core.errors import ConfigError, UserError
from mcl_lightning.core.outputs import check_output_file
from mcl_lightning.models import PeerNetwork, count_parameters
from mcl_lightning.runtime.checkpointing import read_checkpoint


def load_peers(checkpoint_path: str | Path) -> PeerNetwork:
    """Rebuild the checkpoint's PeerNetwork (registry backbones) with its trained weights."""
    checkpoint = read_checkpoint(checkpoint_path)
    spec = checkpoint.get("peers_spec")
    if spec is None:
        raise ConfigError(
            f"{checkpoint_path} does not describe its peers (built from your own modules, or not by "
            "OKDSystem); rebuild them yourself and use OKDSystem.load_from_checkpoint(path, peers=..., method=...)"
        )
    peers = PeerNetwork.from_backbone(**spec)
    state = {k.removeprefix("peers."): v for k, v in checkpoint["state_dict"].items() if k.startswith("peers.")}
    peers.load_state_dict(state)
    return peers.eval()


def image_size_of(checkpoint_path: str | Path) -> int:
    """The training images' side: the DataModule's ``image_size`` saved in the checkpoint (ImageNet:
    224), else 32 (CIFAR, whose DataModule has no such option)."""
    checkpoint = read_checkpoint(checkpoint_path)
    return int((checkpoint.get("datamodule_hyper_parameters") or {}).get("image_size", 32))


def export_peer(checkpoint_path: str | Path, peer: int = -1) -> nn.Module:
    """Peer ``peer`` (default: the last, the one the online teacher distils into) as a plain backbone."""
    return load_peers(checkpoint_path).export_peer(peer).eval()


def program_of(network: nn.Module, image_size: int = 32) -> torch.export.ExportedProgram:
    """``torch.export`` of ``network`` (eval mode) for (batch, 3, image_size, image_size) inputs, any batch."""
    network = network.eval()
    example = torch.randn(2, 3, image_size, image_size, device=next(network.parameters()).device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return torch.export.export(network, (example,), dynamic_shapes=({0: batch},))


def export_program(checkpoint_path: str | Path, peer: int = -1) -> torch.export.ExportedProgram:
    """Peer ``peer`` as a ``torch.export`` program for the checkpoint's image size (save it with
    ``torch.export.save``)."""
    return program_of(export_peer(checkpoint_path, peer), image_size_of(checkpoint_path))


def constructor(name: str, num_classes: int) -> str:
    """The call that builds an empty network of the exported peer's kind."""
    library, _, model = name.rpartition(":")
    calls = {"timm": "timm.create_model", "torchvision": "torchvision.models.get_model", "": "create_backbone"}
    return f"{calls[library]}({model!r}, num_classes={num_classes})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--peer", type=int, default=-1, help="which peer (default: the last)")
    parser.add_argument("--out", type=Path, help="where to write the peer's state_dict")
    parser.add_argument("--program", type=Path, help="where to write a torch.export program of the peer (.pt2)")
    args = parser.parse_args(argv)
    if args.out is None and args.program is None:
        parser.error("pass --out (a state_dict), --program (a torch.export program), or both")
    try:
        write(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def write(args: argparse.Namespace) -> None:
    for option, path in (("--out", args.out), ("--program", args.program)):  # both, before writing either
        if path is not None:
            check_output_file(path, option, inputs=(args.checkpoint,), create_parent=False)
    peers = load_peers(args.checkpoint)
    if not -peers.num_peers <= args.peer < peers.num_peers:
        raise ConfigError(f"--peer {args.peer}: the checkpoint has {peers.num_peers} peers; pass 0 to "
                          f"{peers.num_peers - 1} (or -1, the last)")
    network = peers.export_peer(args.peer).eval()
    spec, index = peers.build_spec, args.peer % peers.num_peers
    name = spec["backbone"] if isinstance(spec["backbone"], str) else spec["backbone"][index]
    about = f"peer {index} of {peers.num_peers}: {name}, {spec['num_classes']} classes, {count_parameters(network):,} parameters"
    if args.out is not None:
        torch.save(network.state_dict(), args.out)
        print(f"{about} -> {args.out}")
        print(f"load with: {constructor(name, spec['num_classes'])}.load_state_dict(torch.load(...))")
    if args.program is not None:
        size = image_size_of(args.checkpoint)
        torch.export.save(program_of(network, size), args.program)
        print(f"{about} -> {args.program}")
        print(f"load with: torch.export.load(path).module()  (inputs: (batch, 3, {size}, {size}), normalised)")


if __name__ == "__main__":
    main()
