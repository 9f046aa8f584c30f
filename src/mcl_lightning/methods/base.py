"""The OKD method interface: one small class per method, returning named loss terms.

A method is an ``nn.Module`` (so whatever it learns or remembers, e.g. projection heads and memory
banks, is trained by the same optimiser and saved in the same checkpoint) called once per
training step:

    method(output: PeerOutput, labels: (B,), indices: (B,)) -> {"term": weighted loss, ...}

The system minimises the sum of the terms and logs each. Add a method: one file in ``methods/``
with a subclass registered by ``@register_method("name")``, and ``conf/method/name.yaml``.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from mcl_lightning.errors import ConfigError
from mcl_lightning.models.peers import PeerOutput


class OKDMethod(nn.Module):
    """Base class. ``num_peers`` and ``feature_dim`` come from the peer network."""

    name: str = "base"
    needs_train_labels: bool = False  # True: setup_data must receive the training set's labels

    def __init__(self, num_peers: int, feature_dim: int) -> None:
        super().__init__()
        if num_peers < 1:
            raise ConfigError(f"peers must be >= 1, got {num_peers}")
        self.num_peers, self.feature_dim = num_peers, feature_dim

    def setup_data(self, train_labels: Tensor) -> None:
        """Called once the training set is known (labels in dataset-index order). Default: no-op."""

    def forward(self, output: PeerOutput, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def check_output(self, output: PeerOutput) -> None:
        """One clear message when the network does not match what this method was built for."""
        if output.num_peers != self.num_peers or output.features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"method {self.name!r} was built for {self.num_peers} peers with {self.feature_dim}-d "
                f"features, but the network gave {output.num_peers} peers with {output.features.shape[-1]}-d "
                "features; build it with num_peers=peers.num_peers, feature_dim=peers.feature_dim"
            )


_METHODS: dict[str, type[OKDMethod]] = {}


def register_method(name: str) -> Callable[[type[OKDMethod]], type[OKDMethod]]:
    def decorator(cls: type[OKDMethod]) -> type[OKDMethod]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[OKDMethod]:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(list_methods())}")
    return _METHODS[name]
