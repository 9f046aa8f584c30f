"""The OKD method interface: one small class per method, returning named loss terms.

A method is an ``nn.Module`` (so whatever it learns or remembers, e.g. projection heads and memory
banks, is trained by the same optimiser and saved in the same checkpoint). It is constructed with
its own options only; ``OKDSystem`` then attaches it to the peer network, once, which is where
everything that depends on the network (peer count, feature widths, the trunk) is built:

    method = MCLOKD(nce_k=256)            # options only
    system = OKDSystem(peers, method)     # calls method.attach(peers.spec()) -> method.build(spec)

and then, once per training step:

    method(output: PeerOutput, labels: (B,), indices: (B,) or None) -> {"term": weighted loss, ...}

``indices`` (each sample's index in the training set) is None for ``(images, labels)`` batches; a method
that needs them (one memory-bank row per training image) sets ``needs_indices = True`` and the system
refuses such batches in one line.

The system minimises the sum of the terms and logs each. Hooks a method may override, all optional:

- ``reference_layout`` (class attribute): how its reference shares layers between peers; the config's
  ``model.layout`` builds the network with it unless ``topology=`` / ``backbone.branch_point=`` say otherwise.
- ``min_peers``, ``accepts_heterogeneous``, ``requires_shared_trunk``: checked in ``attach``.
- ``build(spec)``: create the network-dependent modules (heads, gates).
- ``ensemble(output)``: the logits its ensemble reports (default: mean of the peers' logits).
- ``parameter_groups(base)``: optimiser groups for its parameters (default: one group, SGD's settings).
- ``set_epoch(epoch, max_epochs)``: called at the start of every training epoch (``self.epoch``
  and ``self.max_epochs`` then hold them; ramps read them).
- ``setup_data(train_labels)``: called once the training set is known (``needs_train_labels``).

Add a method: one file in ``methods/`` with a subclass registered by ``@register_method("name")``,
and ``conf/method/name.yaml``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.models.contract import PeerLayout, PeerOutput, PeerSpec
from mcl_lightning.core.registry import Registry
from mcl_lightning.core.spec import init_options, record_init_options


class OKDMethod(nn.Module):
    """Base class; see the module docstring for the hooks."""

    name: ClassVar[str] = "base"
    reference_layout: ClassVar[PeerLayout] = PeerLayout()
    min_peers: ClassVar[int] = 1
    accepts_heterogeneous: ClassVar[bool] = True
    requires_shared_trunk: ClassVar[bool] = False
    needs_train_labels: ClassVar[bool] = False  # True: setup_data must receive the training set's labels
    needs_indices: ClassVar[bool] = False  # True: batches must carry dataset indices (memory banks); else None
    ensemble_description: ClassVar[str] = "mean of the peers' logits"

    def __init__(self) -> None:
        super().__init__()
        self.spec: PeerSpec | None = None
        self.epoch, self.max_epochs = 0, None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        record_init_options(cls)  # checkpoints carry the constructor's options (OKDSystem.from_checkpoint)

    @property
    def constructor_options(self) -> dict[str, Any]:
        """The options this method was constructed with."""
        return init_options(self)

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, spec: PeerSpec) -> None:
        """Check that this method can train ``spec``'s network, then ``build`` for it (once)."""
        if self.spec is not None:
            if spec == self.spec:
                return
            raise ConfigError(
                f"method {self.name!r} is already attached to a network of {self.spec.num_peers} peers with "
                f"feature widths {self.spec.feature_dims}; build a new method for this one"
            )
        if spec.num_peers < self.min_peers:
            raise ConfigError(
                f"method {self.name!r} needs peers >= {self.min_peers}, got {spec.num_peers}; set peers="
                f"{max(self.min_peers, 2)} or more, or use method=independent for a single network"
            )
        if spec.heterogeneous and not self.accepts_heterogeneous:
            names = ", ".join(spec.backbones) if spec.backbones else f"feature widths {spec.feature_dims}"
            raise ConfigError(
                f"method {self.name!r} needs peers of one backbone, as its reference; got different peers "
                f"({names}). Heterogeneous peers work with {', '.join(heterogeneous_methods())}"
            )
        if self.requires_shared_trunk and spec.trunk_channels is None:
            raise ConfigError(
                f"method {self.name!r} reads the shared trunk's output, but the network has none "
                f"(topology={spec.topology}); use topology=shared_trunk"
            )
        self.spec = spec
        self.build(spec)

    def build(self, spec: PeerSpec) -> None:
        """Create whatever depends on the network (projection heads, gates). Default: nothing."""

    @property
    def num_peers(self) -> int:
        return self._attached().num_peers

    def _attached(self) -> PeerSpec:
        if self.spec is None:
            raise RuntimeError(f"method {self.name!r} is not attached to a network: pass it to OKDSystem(peers, method)")
        return self.spec

    # -- hooks --------------------------------------------------------------------------------
    def setup_data(self, train_labels: Tensor) -> None:
        """Called once the training set is known (labels in dataset-index order). Default: no-op."""

    def set_epoch(self, epoch: int, max_epochs: int | None) -> None:
        """Called by the system at the start of every training epoch (0-based)."""
        self.epoch, self.max_epochs = epoch, max_epochs

    def ensemble(self, output: PeerOutput) -> Tensor:
        """Logits (B, classes) of the ensemble this method reports. Default: mean of the peers' logits."""
        return output.logits.mean(0)

    def parameter_groups(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        """Optimiser groups for this method's own parameters; ``base`` holds SGD's settings.

        Default: one group with the optimiser's settings (the reference trains heads like the network).
        A method overriding it may, e.g., return ``{"params": ..., "weight_decay": 0.0}``.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    def forward(self, output: PeerOutput, labels: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"attached to {self.spec.num_peers} peers" if self.spec else "not attached"


METHODS: Registry[type[OKDMethod]] = Registry("method", example="method=mcl_okd")


def register_method(name: str) -> Callable[[type[OKDMethod]], type[OKDMethod]]:
    """Class decorator: register an ``OKDMethod`` subclass under ``name`` (also its ``.name``)."""

    def decorator(cls: type[OKDMethod]) -> type[OKDMethod]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def reference_layout(method: OKDMethod) -> PeerLayout:
    """How ``method``'s reference shares layers between peers: the config's ``model.layout`` (conf/train.yaml),
    so that ``instantiate(cfg.model)`` builds the network ``python -m mcl_lightning.train`` trains."""
    if not isinstance(method, OKDMethod):
        raise TypeError(f"reference_layout needs an OKDMethod instance, got {type(method).__name__}")
    return method.reference_layout


def list_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> type[OKDMethod]:
    return METHODS.get(name)


def heterogeneous_methods() -> list[str]:
    """The registered methods that accept peers of different backbones."""
    return [name for name in METHODS.names() if METHODS.get(name).accepts_heterogeneous]
