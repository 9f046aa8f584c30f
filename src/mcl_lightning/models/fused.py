"""Identical peers run as one wide network: every convolution grouped over the peers.

N peers of one backbone (independent topology, or the branches after a shared trunk) are
rewritten as one network whose layers hold all peers side by side: a convolution of peer width C
becomes one ``Conv2d(N C_in, N C_out, groups=N)`` (group i is peer i's kernel), a BatchNorm over
C channels one BatchNorm over N C channels (per-channel statistics are per-peer statistics), and
the N classifiers one batched matrix product. The input (the image, or the trunk's output) is
repeated once per peer along the channels. Outputs and gradients are the per-peer loop's up to
float rounding (the same sums, grouped into fewer, larger kernels), and SGD, being elementwise,
trains both alike (tests/test_fused_peers.py checks all three on CPU).

Why: small CIFAR networks at batch 64-256 are bound by kernel launches on a GPU; one grouped
kernel per layer instead of N cuts the launches N-fold (the Packed-Ensembles construction with
alpha = gamma = 1; see docs/benchmarks.md for what it measures).

The module keeps the peer network's interface (``spec``, ``build_spec``, ``export_peer``,
``PeerOutput``) and its checkpoint layout: ``state_dict`` writes, and ``load_state_dict`` reads,
the keys of the equivalent ``PeerNetwork`` (``branches.<i>....``, ``classifiers.<i>....``),
so checkpoints, ``mcl_lightning.export`` and evaluation do not know the difference. Optimiser
state (momentum buffers) has the fused shapes: resume with the same ``perf.fuse_peers`` setting.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.models.cifar_resnet import BasicBlock, Bottleneck
from mcl_lightning.models.contract import PeerOutput, PeerSpec
from mcl_lightning.models.peers import PeerNetwork, split_gradient
from mcl_lightning.models.wrn import WideBasicBlock

# Modules whose forward mixes channels only through their sub-modules (so replacing those by
# grouped ones fuses the block); extend with register_fusable_block.
_BLOCKS: set[type[nn.Module]] = {BasicBlock, Bottleneck, WideBasicBlock}
# Parameter-free modules that act per channel: shared as they are.
_PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Identity, nn.AdaptiveAvgPool2d, nn.AvgPool2d,
                nn.MaxPool2d, nn.Flatten, nn.Dropout)


def register_fusable_block(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare a block fusable: its forward combines its sub-modules' outputs only elementwise
    (additions, activations), never across channels. Usable as a class decorator."""
    _BLOCKS.add(cls)
    return cls


def _fuse(modules: Sequence[nn.Module], where: str) -> nn.Module:
    """One module equivalent to ``modules`` (one per peer, same structure) on peer-stacked channels."""
    first = modules[0]
    kind = type(first)
    if any(type(m) is not kind for m in modules):
        raise ConfigError(f"perf.fuse_peers needs peers of one architecture; they differ at {where or 'the top'}")
    if kind is nn.Conv2d:
        n = len(modules)
        conv = nn.Conv2d(
            first.in_channels * n, first.out_channels * n, first.kernel_size, first.stride, first.padding,
            first.dilation, first.groups * n, first.bias is not None, first.padding_mode,
            device=first.weight.device, dtype=first.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(torch.cat([m.weight for m in modules]))
            if first.bias is not None:
                conv.bias.copy_(torch.cat([m.bias for m in modules]))
        return conv
    if kind is nn.BatchNorm2d:
        n = len(modules)
        ref = first.weight if first.affine else first.running_mean
        bn = nn.BatchNorm2d(first.num_features * n, first.eps, first.momentum, first.affine,
                            first.track_running_stats, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(first, name) is not None:
                    getattr(bn, name).copy_(torch.cat([getattr(m, name) for m in modules]))
            if first.track_running_stats:
                bn.num_batches_tracked.copy_(first.num_batches_tracked)
        return bn
    if isinstance(first, _PER_CHANNEL):
        return copy.deepcopy(first)
    if kind is nn.Sequential:
        if len({len(m) for m in modules}) != 1:  # e.g. resnet8 and resnet20: stages of different depths
            raise ConfigError(f"perf.fuse_peers needs peers of one architecture; their depths differ at {where or 'the top'}")
        return nn.Sequential(*(_fuse([m[i] for m in modules], f"{where}.{i}") for i in range(len(first))))
    if kind in _BLOCKS:
        block = copy.deepcopy(first)
        for name, _ in first.named_children():
            setattr(block, name, _fuse([getattr(m, name) for m in modules], f"{where}.{name}"))
        return block
    raise ConfigError(
        f"perf.fuse_peers cannot fuse {kind.__name__} (at {where or 'the top'}): it handles Conv2d, BatchNorm2d, "
        f"per-channel layers, Sequential and the blocks {sorted(c.__name__ for c in _BLOCKS)} "
        "(mcl_lightning.models.fused.register_fusable_block adds one)"
    )


class FusedPeerNetwork(nn.Module):
    """A ``PeerNetwork`` of identical peers (independent, or shared trunk without pair stage)
    computed as one grouped network; build it with ``from_peers``."""

    def __init__(self, peers: PeerNetwork) -> None:
        super().__init__()
        if not isinstance(peers, PeerNetwork):
            raise ConfigError(f"perf.fuse_peers needs a PeerNetwork, got {type(peers).__name__}")
        if peers.groups is not None:
            raise ConfigError("perf.fuse_peers does not handle a pair-shared stage (CL-ILR's layout); set it false")
        if len(set(peers.feature_dims)) != 1:
            raise ConfigError(f"perf.fuse_peers needs peers of one width, got feature widths {peers.feature_dims}")
        n = peers.num_peers
        self.has_trunk = peers.has_trunk
        self.trunk = peers.trunk
        self.rescale_split_gradients = peers.rescale_split_gradients
        self.fused_branch = _fuse(list(peers.branches), "branches")
        heads = list(peers.classifiers)
        if not all(isinstance(h, nn.Linear) and h.weight.shape == heads[0].weight.shape and h.bias is not None
                   for h in heads):
            raise ConfigError("perf.fuse_peers needs one nn.Linear classifier (with bias) of the same shape per peer")
        self.classifier_weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]).clone())  # (N, K, C)
        self.classifier_bias = nn.Parameter(torch.stack([h.bias.detach() for h in heads]).clone())  # (N, K)
        # The unfused network on the meta device: its metadata answers spec()/build_spec, and
        # loading this module's (per-peer) state dict into a copy of it gives the peers back.
        template = copy.deepcopy(peers).to("meta")
        self.__dict__["_template"] = template  # not a sub-module: no parameters, not in state_dict
        self.num_peers = n
        self.feature_dims = peers.feature_dims
        self.trunk_channels = peers.trunk_channels
        self.register_state_dict_post_hook(_to_peer_layout)
        self.register_load_state_dict_pre_hook(_from_peer_layout)

    @classmethod
    def from_peers(cls, peers: PeerNetwork) -> "FusedPeerNetwork":
        """The fused equivalent of ``peers`` (weights copied; ``peers`` itself is left unchanged,
        except that a shared trunk is shared with the result)."""
        return cls(peers)

    # -- the PeerNetwork interface -------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return self.feature_dims[0]

    @property
    def topology(self) -> str:
        return self._template.topology

    @property
    def build_spec(self) -> dict | None:
        return self._template.build_spec

    def spec(self) -> PeerSpec:
        return self._template.spec()

    def forward(self, x: Tensor) -> PeerOutput:
        shared = self.trunk(x)
        n = self.num_peers
        h = split_gradient(shared, n) if self.rescale_split_gradients else shared
        # every peer reads the same input: one copy per peer along the channels (cat keeps the
        # memory format, so channels_last stays channels_last)
        features = self.fused_branch(torch.cat([h] * n, dim=1))  # (B, N C)
        batch = features.shape[0]
        features = features.view(batch, n, -1).transpose(0, 1).contiguous()  # (N, B, C)
        logits = torch.baddbmm(self.classifier_bias.unsqueeze(1), features, self.classifier_weight.transpose(1, 2))
        return PeerOutput(logits, features, shared if self.has_trunk else None)

    def to_peer_network(self) -> PeerNetwork:
        """The equivalent unfused ``PeerNetwork``, with this network's current weights."""
        peers = copy.deepcopy(self._template)
        peers.load_state_dict(self.state_dict(), assign=True)
        return peers.to(self.classifier_weight.device)

    def export_peer(self, index: int) -> nn.Module:
        """Peer ``index`` as one plain network (see ``PeerNetwork.export_peer``)."""
        return self.to_peer_network().export_peer(index)

    def extra_repr(self) -> str:
        return f"num_peers={self.num_peers}, topology={self.topology}"


_SHARED_BUFFER = "num_batches_tracked"


def _to_peer_layout(module: FusedPeerNetwork, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: fused keys -> the per-peer keys of the equivalent PeerNetwork."""
    n = module.num_peers
    for key in [k for k in state_dict if k.startswith(prefix + "fused_branch.")]:
        value = state_dict.pop(key)
        rest = key[len(prefix + "fused_branch."):]
        chunks = [value] * n if rest.endswith(_SHARED_BUFFER) else value.chunk(n)
        for i, chunk in enumerate(chunks):
            state_dict[f"{prefix}branches.{i}.{rest}"] = chunk.clone()
    for name, field in (("classifier_weight", "weight"), ("classifier_bias", "bias")):
        value = state_dict.pop(prefix + name)
        for i in range(n):
            state_dict[f"{prefix}classifiers.{i}.{field}"] = value[i].clone()


def _from_peer_layout(module: FusedPeerNetwork, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: per-peer keys (as saved) -> the fused keys."""
    n = module.num_peers
    head = prefix + "branches.0."
    for key in [k for k in state_dict if k.startswith(head)]:
        rest = key[len(head):]
        parts = [state_dict.pop(f"{prefix}branches.{i}.{rest}") for i in range(n)]
        state_dict[f"{prefix}fused_branch.{rest}"] = parts[0] if rest.endswith(_SHARED_BUFFER) else torch.cat(parts)
    for name, field in (("classifier_weight", "weight"), ("classifier_bias", "bias")):
        keys = [f"{prefix}classifiers.{i}.{field}" for i in range(n)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])
