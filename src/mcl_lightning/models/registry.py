"""Backbones by name, in the spirit of timm's model registry.

A backbone is a `StagedBackbone`: a list of stages, a pooling head and a linear classifier. The
split into stages is what lets `PeerNetwork` share the early stages between peers (the
reference's multi-branch topology) without each backbone knowing about peers.

Add a backbone: write one file in `models/` with a constructor decorated by
`@register_backbone("name")`, import it in `models/__init__.py`, and add `conf/backbone/name.yaml`.
"""

from __future__ import annotations

from typing import Callable

from mcl_lightning.models.staged import (  # noqa: F401  (re-exported: the backbone files import them from here)
    StagedBackbone, bn_relu_pool, count_parameters, dense_stages, feature_dim_of, kaiming_init,
)
from mcl_lightning.core.registry import Registry


BackboneFactory = Callable[..., StagedBackbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone", example="backbone=resnet32")


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``fn(num_classes=..., **kwargs) -> StagedBackbone`` under ``name``."""
    return BACKBONES.register(name)


def list_backbones() -> list[str]:
    """The registered backbone names, sorted."""
    return BACKBONES.names()


def create_backbone(name: str, num_classes: int = 100, **kwargs) -> StagedBackbone:
    """Build the backbone registered as ``name``, or a library network named ``timm:<model>`` /
    ``torchvision:<model>`` (``models/library.py``; ``pretrained=PATH`` for those)."""
    if ":" in name:
        from mcl_lightning.models.library import create_library_backbone

        return create_library_backbone(name, num_classes=num_classes, **kwargs)
    return BACKBONES.get(name)(num_classes=num_classes, **kwargs)
