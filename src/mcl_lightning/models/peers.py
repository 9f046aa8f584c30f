"""N peer networks behind one forward call.

Two topologies:
- ``shared_trunk``: the backbone's first ``branch_point`` stages run once and are shared; each peer
  owns the later stages, the pooling head and the classifier (the reference's multi-branch model).
- ``independent``: N full copies (``branch_point = 0``, nothing shared).

Either way, peer ``i`` alone is exactly the plain backbone: ``export_peer(i)`` returns it, with the
shared trunk's weights copied in, ready to deploy at no extra inference cost.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from mcl_lightning.errors import ConfigError
from mcl_lightning.models.registry import StagedBackbone, create_backbone, feature_dim_of

TOPOLOGIES = ("shared_trunk", "independent")


@dataclass
class PeerOutput:
    """What every OKD method consumes.

    Attributes:
        logits: (N, B, num_classes), peer i's logits at ``logits[i]``.
        features: (N, B, C), peer i's pooled penultimate features (the input of its classifier).
    """

    logits: Tensor
    features: Tensor

    @property
    def num_peers(self) -> int:
        return self.logits.shape[0]


class PeerNetwork(nn.Module):
    """``trunk`` once, then for each peer ``classifier_i(branch_i(trunk(x)))``.

    Args:
        branches: one module per peer, mapping the trunk's output to pooled features (B, C).
        classifiers: one module per peer, mapping (B, C) features to logits.
        trunk: the shared part (``None`` = nothing shared).
        feature_dim: C; found with a dummy 32x32 forward pass when not given.

    Build from the registry with :meth:`from_backbone`, or from your own networks with
    :meth:`from_modules`.
    """

    def __init__(
        self,
        branches: Sequence[nn.Module],
        classifiers: Sequence[nn.Module],
        trunk: nn.Module | None = None,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        if len(branches) < 1 or len(branches) != len(classifiers):
            raise ConfigError(
                f"need at least one peer and one classifier per branch; got {len(branches)} "
                f"branches and {len(classifiers)} classifiers"
            )
        self.trunk = trunk if trunk is not None else nn.Identity()
        self.branches = nn.ModuleList(branches)
        self.classifiers = nn.ModuleList(classifiers)
        self.feature_dim = feature_dim or feature_dim_of(nn.Sequential(self.trunk, self.branches[0]))
        # How export_peer reassembles one peer: set by from_backbone / from_modules.
        self._backbone_spec: dict | None = None
        self._classifier_attr: str | None = None

    @property
    def num_peers(self) -> int:
        return len(self.branches)

    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        num_peers: int = 4,
        topology: str = "shared_trunk",
        num_classes: int = 100,
        branch_point: int | None = None,
    ) -> "PeerNetwork":
        """N peers of the registered backbone ``backbone``.

        ``branch_point`` (shared_trunk only) overrides the backbone's reference branch point: the
        number of leading stages (stem = stage 0) that the peers share.
        """
        if num_peers < 1:
            raise ConfigError(f"peers must be >= 1, got {num_peers} (e.g. peers=4)")
        if topology not in TOPOLOGIES:
            raise ConfigError(f"unknown topology {topology!r}; choose one of: {', '.join(TOPOLOGIES)}")
        nets = [create_backbone(backbone, num_classes=num_classes) for _ in range(num_peers)]
        n_stages = len(nets[0].stages)
        if topology == "independent":
            if branch_point not in (None, 0):
                raise ConfigError("branch_point applies to topology=shared_trunk only; leave it unset")
            point = 0
        else:
            point = nets[0].branch_point if branch_point is None else branch_point
            if not 0 <= point < n_stages:
                raise ConfigError(
                    f"branch_point must be in [0, {n_stages - 1}] for {backbone} ({n_stages} stages), got {point}"
                )
        trunk = nn.Sequential(*nets[0].stages[:point]) if point > 0 else None
        branches = [nn.Sequential(*net.stages[point:], net.pool) for net in nets]
        peers = cls(branches, [net.classifier for net in nets], trunk, feature_dim=nets[0].feature_dim)
        peers._backbone_spec = {"name": backbone, "num_classes": num_classes, "branch_point": point}
        return peers

    @property
    def build_spec(self) -> dict | None:
        """``from_backbone`` arguments that rebuild this network (None for ``from_modules``)."""
        if self._backbone_spec is None:
            return None
        spec = self._backbone_spec
        topology = "shared_trunk" if spec["branch_point"] > 0 else "independent"
        return {
            "backbone": spec["name"],
            "num_peers": self.num_peers,
            "topology": topology,
            "num_classes": spec["num_classes"],
            "branch_point": spec["branch_point"] if topology == "shared_trunk" else None,
        }

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module], classifier: str = "fc") -> "PeerNetwork":
        """Adapter for your own networks (independent topology).

        Each module must hold its final linear layer as the attribute named ``classifier`` (``fc``
        for torchvision ResNets); everything before it must produce pooled features (B, C). The
        modules are deep-copied and split into feature extractor + classifier; ``export_peer``
        puts them back together.
        """
        branches, heads = [], []
        for module in modules:
            if not isinstance(getattr(module, classifier, None), nn.Module):
                raise ConfigError(
                    f"{type(module).__name__} has no sub-module {classifier!r}; pass "
                    "classifier='<name of its final linear layer>'"
                )
            module = copy.deepcopy(module)
            heads.append(getattr(module, classifier))
            setattr(module, classifier, nn.Identity())
            branches.append(module)
        peers = cls(branches, heads)
        peers._classifier_attr = classifier
        return peers

    def forward(self, x: Tensor) -> PeerOutput:
        shared = self.trunk(x)
        features = [branch(shared) for branch in self.branches]
        for i, f in enumerate(features):  # shape metadata only: no host sync
            if f.dim() != 2:
                raise ValueError(
                    f"peer {i}'s branch returned features of shape {tuple(f.shape)}; every branch must "
                    "return pooled (batch, channels) features: end it with global pooling and flatten"
                )
        logits = [head(f) for head, f in zip(self.classifiers, features)]
        return PeerOutput(torch.stack(logits), torch.stack(features))

    def export_peer(self, index: int) -> nn.Module:
        """Peer ``index`` as one plain network (a deep copy, trunk weights included)."""
        if not -self.num_peers <= index < self.num_peers:
            raise IndexError(f"peer {index} out of range for {self.num_peers} peers")
        branch, head = self.branches[index], self.classifiers[index]
        if self._backbone_spec is None and self._classifier_attr is None:
            return copy.deepcopy(nn.Sequential(self.trunk, branch, head))
        if self._backbone_spec is None:
            module = copy.deepcopy(branch)
            setattr(module, self._classifier_attr, copy.deepcopy(head))
            return module
        spec = self._backbone_spec
        net = create_backbone(spec["name"], num_classes=spec["num_classes"])
        point = spec["branch_point"]
        trunk_stages = list(self.trunk) if point > 0 else []
        for target, source in zip(net.stages, trunk_stages + list(branch)[:-1]):
            target.load_state_dict(source.state_dict())
        net.pool.load_state_dict(branch[-1].state_dict())
        net.classifier.load_state_dict(head.state_dict())
        return net.to(next(self.parameters()).device)
