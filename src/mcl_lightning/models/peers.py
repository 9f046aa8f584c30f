"""N peer networks behind one forward call.

Topologies:
- ``shared_trunk``: the backbone's first ``branch_point`` stages run once and are shared; each peer
  owns the later stages, the pooling head and the classifier (the reference's multi-branch model).
  With ``PeerLayout(pair_stage=True)`` the next stage is shared by pairs of peers (CL-ILR's binary
  tree), and ``rescale_split_gradients`` divides the gradient at every split by its number of
  children (ILR: identity forward).
- ``independent``: N full copies (nothing shared); the peers may be different backbones.

Either way, peer ``i`` alone is exactly the plain backbone: ``export_peer(i)`` returns it, with the
shared weights copied in, ready to deploy at no extra inference cost.

(About 340 lines, over the package's 300-line aim: building a topology, running it and exporting one
peer from it read the same module lists, and split apart each would need the others' internals.)
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.models.library import check_library_peers
from mcl_lightning.models.registry import StagedBackbone, create_backbone, feature_dim_of
from mcl_lightning.core.registry import check_choice
from mcl_lightning.models.contract import TOPOLOGIES, PeerLayout, PeerOutput, PeerSpec

class _SplitGradient(torch.autograd.Function):
    """Identity forward; gradient divided by ``children`` (Song & Chai's ILR)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, children: int) -> Tensor:
        ctx.children = children
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad / ctx.children, None


def split_gradient(x: Tensor, children: int) -> Tensor:
    """``x`` unchanged; its gradient divided by ``children`` (no-op for one child)."""
    return _SplitGradient.apply(x, children) if children > 1 else x


class PeerNetwork(nn.Module):
    """``trunk`` once, then for each peer ``classifier_i(branch_i(group_g(i)(trunk(x))))``.

    Args:
        branches: one module per peer, mapping its input to pooled features (B, C_i).
        classifiers: one module per peer, mapping (B, C_i) features to logits.
        trunk: the shared part (``None`` = nothing shared).
        groups: optional modules between trunk and branches, each shared by several peers.
        group_of: the group index of each peer (required with ``groups``).
        rescale_split_gradients: divide gradients by the number of children at each split.
        feature_dims: each C_i; found with a dummy 32x32 forward pass when not given.

    Build from the registry with ``from_backbone``, or from your own networks with
    ``from_modules``.
    """

    def __init__(
        self,
        branches: Sequence[nn.Module],
        classifiers: Sequence[nn.Module],
        trunk: nn.Module | None = None,
        groups: Sequence[nn.Module] | None = None,
        group_of: Sequence[int] | None = None,
        rescale_split_gradients: bool = False,
        feature_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(branches) < 1 or len(branches) != len(classifiers):
            raise ConfigError(
                f"need at least one peer and one classifier per branch; got {len(branches)} "
                f"branches and {len(classifiers)} classifiers"
            )
        if (groups is None) != (group_of is None) or (group_of is not None and len(group_of) != len(branches)):
            raise ValueError("groups and group_of go together, with one group index per branch")
        self.has_trunk = trunk is not None
        self.trunk = trunk if trunk is not None else nn.Identity()
        self.groups = nn.ModuleList(groups) if groups is not None else None
        self.group_of = list(group_of) if group_of is not None else None
        self.branches = nn.ModuleList(branches)
        self.classifiers = nn.ModuleList(classifiers)
        self.rescale_split_gradients = rescale_split_gradients
        self.feature_dims = tuple(feature_dims) if feature_dims is not None else tuple(
            feature_dim_of(nn.Sequential(*self._path(i))) for i in range(len(branches))
        )
        self.trunk_channels = _channels_of(self.trunk) if self.has_trunk else None
        # How export_peer reassembles one peer: set by from_backbone / from_modules.
        self._backbone_spec: dict | None = None
        self._classifier_attr: str | None = None

    @property
    def num_peers(self) -> int:
        return len(self.branches)

    @property
    def feature_dim(self) -> int:
        """The peers' common feature width (an error for heterogeneous peers: see ``feature_dims``)."""
        if len(set(self.feature_dims)) != 1:
            raise ValueError(f"the peers have different feature widths {self.feature_dims}; use feature_dims")
        return self.feature_dims[0]

    @property
    def topology(self) -> str:
        return "shared_trunk" if self.has_trunk or self.groups is not None else "independent"

    def spec(self) -> PeerSpec:
        """What methods may know of this network (see ``OKDMethod.attach``)."""
        linears = _linears(self.classifiers[0])  # a Linear, or a head (Sequential) whose last Linear gives them
        num_classes = linears[-1].out_features if linears else None
        if num_classes is None:
            num_classes = self._backbone_spec["num_classes"] if self._backbone_spec else -1
        names = tuple(self._backbone_spec["backbones"]) if self._backbone_spec else None
        return PeerSpec(self.num_peers, self.feature_dims, int(num_classes), self.topology, self.trunk_channels, names)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        backbone: str | Sequence[str],
        num_peers: int | None = None,
        topology: str | None = None,
        num_classes: int = 100,
        branch_point: int | None = None,
        layout: PeerLayout | dict | None = None,
        pretrained: str | None = None,
    ) -> "PeerNetwork":
        """N peers of the registered backbone ``backbone``, or one peer per name in a list.

        Args:
            backbone: a registry name, or a list of names (heterogeneous peers, independent only).
            num_peers: N (default 4; with a list of names, its length).
            topology: ``shared_trunk`` or ``independent``; ``None`` takes ``layout.topology``
                (independent for heterogeneous peers).
            branch_point: leading stages (stem = stage 0) the peers share; ``None`` = the
                backbone's reference branch point plus ``layout.branch_offset``.
            layout: how the method's reference shares layers (default: ``PeerLayout()``).
            pretrained: a local weights file for ``timm:``/``torchvision:`` peers (``models/library.py``).
        """
        layout = PeerLayout(**layout) if isinstance(layout, dict) else (layout or PeerLayout())
        names = [backbone] if isinstance(backbone, str) else [str(name) for name in backbone]
        if len(names) > 1:
            if num_peers not in (None, len(names)):
                raise ConfigError(f"{len(names)} backbones were named for {num_peers} peers; give one name per peer")
            num_peers = len(names)
        num_peers = 4 if num_peers is None else int(num_peers)
        if num_peers < 1:
            raise ConfigError(f"peers must be >= 1, got {num_peers} (e.g. peers=4)")
        names = names * num_peers if len(names) == 1 else names
        heterogeneous = len(set(names)) > 1
        library = check_library_peers(names, topology, branch_point, pretrained)  # timm: / torchvision: peers
        topology = topology or ("independent" if heterogeneous or library else layout.topology)
        check_choice("topology", topology, TOPOLOGIES)
        if heterogeneous and topology != "independent":
            raise ConfigError(
                f"peers of different backbones ({', '.join(names)}) cannot share a trunk; set topology=independent"
            )
        weights = {"pretrained": pretrained} if pretrained is not None else {}
        nets = [create_backbone(name, num_classes=num_classes, **weights) for name in names]
        point, pairs = cls._resolve_branch_point(names[0], nets[0], topology, branch_point, layout)
        groups = group_of = None
        if pairs:  # CL-ILR: stage `point` shared by peers (0, 1), (2, 3), ...
            group_of = [i // 2 for i in range(num_peers)]
            groups = [nets[2 * g].stages[point] for g in range(math.ceil(num_peers / 2))]
        own = point + 1 if pairs else point
        trunk = nn.Sequential(*nets[0].stages[:point]) if point > 0 else None
        branches = [nn.Sequential(*net.stages[own:], net.pool) for net in nets]
        peers = cls(
            branches, [net.classifier for net in nets], trunk, groups, group_of,
            rescale_split_gradients=layout.rescale_split_gradients and num_peers > 1,
            feature_dims=[net.feature_dim for net in nets],
        )
        peers._backbone_spec = {
            "backbones": names, "num_classes": num_classes, "branch_point": point, "pair_stage": pairs,
            "rescale_split_gradients": peers.rescale_split_gradients,
        }
        return peers

    @staticmethod
    def _resolve_branch_point(
        name: str, net: StagedBackbone, topology: str, branch_point: int | None, layout: PeerLayout
    ) -> tuple[int, bool]:
        if topology == "independent":
            if branch_point not in (None, 0):
                raise ConfigError("branch_point applies to topology=shared_trunk only; leave it unset")
            return 0, False
        n_stages = len(net.stages)
        point = net.branch_point + layout.branch_offset if branch_point is None else int(branch_point)
        last = n_stages - 2 if layout.pair_stage else n_stages - 1
        if not 0 <= point <= last:
            raise ConfigError(
                f"branch_point must be in [0, {last}] for {name} ({n_stages} stages"
                f"{', one shared by pairs of peers' if layout.pair_stage else ''}), got {point}"
            )
        return point, layout.pair_stage

    @property
    def build_spec(self) -> dict | None:
        """``from_backbone`` arguments that rebuild this network (None for ``from_modules``)."""
        if self._backbone_spec is None:
            return None
        spec = self._backbone_spec
        names = spec["backbones"]
        topology = self.topology
        return {
            "backbone": names[0] if len(set(names)) == 1 else list(names),
            "num_peers": self.num_peers,
            "topology": topology,
            "num_classes": spec["num_classes"],
            "branch_point": spec["branch_point"] if topology == "shared_trunk" else None,
            "layout": {
                "topology": topology, "branch_offset": 0, "pair_stage": spec["pair_stage"],
                "rescale_split_gradients": spec["rescale_split_gradients"],
            },
        }

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module], classifier: str = "fc") -> "PeerNetwork":
        """Adapter for your own networks (independent topology; they may differ).

        Each module must hold its classifier as the attribute named ``classifier`` (``fc`` for
        torchvision ResNets, ``classifier`` for MobileNets): a linear layer, or a head such as an
        ``nn.Sequential`` whose first ``nn.Linear`` takes the features and whose last gives the classes.
        Everything before it must produce pooled features (B, C). The modules are deep-copied and split
        into feature extractor + classifier; ``export_peer`` puts them back together.
        """
        branches, heads = [], []
        for module in modules:
            head = getattr(module, classifier, None)
            if not isinstance(head, nn.Module):
                raise ConfigError(
                    f"{type(module).__name__} has no sub-module {classifier!r}; pass "
                    "classifier='<name of its final linear layer or classifier head>'"
                )
            if not _linears(head):
                raise ConfigError(
                    f"{type(module).__name__}.{classifier} ({type(head).__name__}) holds no nn.Linear, so the number "
                    "of classes is unknown; pass classifier='<the attribute whose last nn.Linear gives the classes>', "
                    "or build PeerNetwork(branches, classifiers) yourself and give OKDSystem num_classes=")
            module = copy.deepcopy(module)
            heads.append(getattr(module, classifier))
            setattr(module, classifier, nn.Identity())
            branches.append(module)
        peers = cls(branches, heads, feature_dims=[_linears(head)[0].in_features for head in heads])
        peers._classifier_attr = classifier
        return peers

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> PeerOutput:
        shared = self.trunk(x)
        inputs = self._branch_inputs(shared)
        features = [branch(h) for branch, h in zip(self.branches, inputs)]
        for i, f in enumerate(features):  # shape metadata only: no host sync
            if f.dim() != 2:
                raise ValueError(
                    f"peer {i}'s branch returned features of shape {tuple(f.shape)}; every branch must "
                    "return pooled (batch, channels) features: end it with global pooling and flatten"
                )
        logits = torch.stack([head(f) for head, f in zip(self.classifiers, features)])
        same_width = len({f.shape[-1] for f in features}) == 1
        return PeerOutput(logits, torch.stack(features) if same_width else tuple(features),
                          shared if self.has_trunk else None)

    def _branch_inputs(self, shared: Tensor) -> list[Tensor]:
        """Each branch's input: the trunk's output, or its group's output (with ILR scaling)."""
        rescale = self.rescale_split_gradients
        if self.groups is None:
            return [split_gradient(shared, self.num_peers) if rescale else shared] * self.num_peers
        into_groups = split_gradient(shared, len(self.groups)) if rescale else shared
        outputs = []
        for g, group in enumerate(self.groups):
            out = group(into_groups)
            outputs.append(split_gradient(out, self.group_of.count(g)) if rescale else out)
        return [outputs[g] for g in self.group_of]

    def _path(self, index: int) -> list[nn.Module]:
        """The modules from input to peer ``index``'s pooled features, in order."""
        path = [self.trunk]
        if self.groups is not None:
            path.append(self.groups[self.group_of[index]])
        return path + [self.branches[index]]

    # -- deployment -----------------------------------------------------------------------------
    def export_peer(self, index: int) -> nn.Module:
        """Peer ``index`` as one plain network (a deep copy, shared weights included)."""
        if not -self.num_peers <= index < self.num_peers:
            raise IndexError(f"peer {index} out of range for {self.num_peers} peers")
        index %= self.num_peers
        branch, head = self.branches[index], self.classifiers[index]
        if self._backbone_spec is None and self._classifier_attr is None:
            return copy.deepcopy(nn.Sequential(*self._path(index), head))
        if self._backbone_spec is None:
            module = copy.deepcopy(branch)
            setattr(module, self._classifier_attr, copy.deepcopy(head))
            return module
        spec = self._backbone_spec
        net = create_backbone(spec["backbones"][index], num_classes=spec["num_classes"])
        stages = list(self.trunk) if self.has_trunk else []
        if self.groups is not None:
            stages.append(self.groups[self.group_of[index]])
        stages += list(branch)[:-1]
        for target, source in zip(net.stages, stages, strict=True):
            target.load_state_dict(source.state_dict())
        net.pool.load_state_dict(branch[-1].state_dict())
        net.classifier.load_state_dict(head.state_dict())
        return net.deployable().to(next(self.parameters()).device)


def build_peers(
    backbone: str,
    peers: int | Sequence[str] = 4,
    topology: str | None = None,
    num_classes: int = 100,
    branch_point: int | None = None,
    layout: PeerLayout | dict | None = None,
    library: str | None = None,
    pretrained: str | None = None,
) -> PeerNetwork:
    """The entry point's builder: ``peers`` is N (N copies of ``backbone``) or a list of backbone
    names (heterogeneous peers, one per name; ``backbone`` is then unused). ``library``: ``timm`` or
    ``torchvision`` (``backbone=timm backbone.name=<model>``), ``pretrained`` a local weights file."""
    if isinstance(peers, int):
        name = f"{library}:{backbone}" if library else backbone
        return PeerNetwork.from_backbone(name, peers, topology, num_classes, branch_point, layout, pretrained)
    names = [str(name) for name in peers]
    if not names:
        raise ConfigError("peers=[] names no backbone; give N (peers=4) or backbone names (peers=[resnet32,wrn_16_2])")
    return PeerNetwork.from_backbone(names, len(names), topology, num_classes, branch_point, layout, pretrained)


def _linears(module: nn.Module) -> list[nn.Linear]:
    """The linear layers of a classifier (itself, or those of a head), in order."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def _channels_of(module: nn.Module) -> int:
    """Channels of a trunk's output, from a dummy 32x32 forward pass (eval mode, then restored)."""
    was_training = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        return int(module(torch.zeros(1, 3, 32, 32, device=device)).shape[1])
    finally:
        module.train(was_training)
