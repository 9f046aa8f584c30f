"""The contract between peers and methods: what a peer network hands a method each step
(``PeerOutput``), what a method may know of the network (``PeerSpec``) and how a method's reference
shares layers between peers (``PeerLayout``). Plain data, importing nothing else from the package.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

TOPOLOGIES = ("shared_trunk", "independent")


@dataclass
class PeerOutput:
    """What every OKD method consumes.

    Attributes:
        logits: (N, B, num_classes), peer i's logits at ``logits[i]``.
        features: peer i's pooled penultimate features (B, C_i) at ``features[i]``. When every peer
            has the same width this is one (N, B, C) tensor (indexing gives views, no copies);
            heterogeneous peers give a tuple of (B, C_i) tensors.
        trunk: the shared trunk's output (B, C, H, W) where the topology has one, else ``None``
            (ONE's gate and OKDDip read it).
    """

    logits: Tensor
    features: Tensor | tuple[Tensor, ...]
    trunk: Tensor | None = None

    @property
    def num_peers(self) -> int:
        return self.logits.shape[0]

    @property
    def feature_dims(self) -> tuple[int, ...]:
        return tuple(int(f.shape[-1]) for f in self.features)

    def stacked_features(self) -> Tensor:
        """(N, B, C), for methods that need equal widths; no copy (it is stored stacked)."""
        if not isinstance(self.features, Tensor):
            raise ValueError(f"peers have different feature widths {self.feature_dims}; this method needs equal widths")
        return self.features


@dataclass(frozen=True)
class PeerSpec:
    """What a method may know of the network it trains: given to ``OKDMethod.attach``.

    Attributes:
        num_peers: N.
        feature_dims: each peer's pooled feature width C_i.
        num_classes: classifier width.
        topology: ``shared_trunk`` or ``independent``.
        trunk_channels: channels of the shared trunk's output (``None`` without a trunk).
        backbones: each peer's registry name (``None`` for networks built from your own modules).
    """

    num_peers: int
    feature_dims: tuple[int, ...]
    num_classes: int
    topology: str
    trunk_channels: int | None = None
    backbones: tuple[str, ...] | None = None

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.feature_dims)) > 1 or (self.backbones is not None and len(set(self.backbones)) > 1)


@dataclass(frozen=True)
class PeerLayout:
    """How a method's reference shares layers between peers (``OKDMethod.reference_layout``).

    Attributes:
        topology: ``shared_trunk`` or ``independent``.
        branch_offset: stages after the backbone's own branch point where the peers split
            (ONE and OKDDip: 1, one stage later than MCL-OKD).
        pair_stage: the first stage after the trunk is shared by pairs of peers (CL-ILR).
        rescale_split_gradients: divide gradients by the number of children at each split (ILR).
    """

    topology: str = "shared_trunk"
    branch_offset: int = 0
    pair_stage: bool = False
    rescale_split_gradients: bool = False
