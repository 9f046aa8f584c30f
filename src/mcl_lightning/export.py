"""Deploy one peer from a training checkpoint: a plain backbone, no peers, heads or banks.

    python -m mcl_lightning.export <run dir>/checkpoints/best-epoch123.ckpt --peer 3 --out resnet32.pt

writes the peer's ``state_dict`` (loadable into ``create_backbone(name, num_classes)``) and prints
what it is. From Python: ``export_peer(path, peer=3)`` returns the ``nn.Module``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from mcl_lightning.errors import ConfigError
from mcl_lightning.models import PeerNetwork, count_parameters


def load_peers(checkpoint_path: str | Path) -> PeerNetwork:
    """Rebuild the checkpoint's PeerNetwork (registry backbones) with its trained weights."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
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


def export_peer(checkpoint_path: str | Path, peer: int = -1) -> nn.Module:
    """Peer ``peer`` (default: the last, the one the online teacher distils into) as a plain backbone."""
    return load_peers(checkpoint_path).export_peer(peer).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--peer", type=int, default=-1, help="which peer (default: the last)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the peer's state_dict")
    args = parser.parse_args(argv)
    peers = load_peers(args.checkpoint)
    network = peers.export_peer(args.peer)
    torch.save(network.state_dict(), args.out)
    spec, index = peers.build_spec, args.peer % peers.num_peers
    name = spec["backbone"] if isinstance(spec["backbone"], str) else spec["backbone"][index]
    print(f"peer {index} of {peers.num_peers}: {name}, {spec['num_classes']} classes, "
          f"{count_parameters(network):,} parameters -> {args.out}")
    print(f"load with: create_backbone({name!r}, num_classes={spec['num_classes']}).load_state_dict(torch.load(...))")


if __name__ == "__main__":
    main()
