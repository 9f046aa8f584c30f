"""Plain ``nn.Module``s: backbones (by name), the peer network, projection heads."""

from mcl_lightning.models import (  # noqa: F401  (register the backbones)
    cifar_resnet,
    densenet,
    hcgnet,
    resnet_imagenet,
    shufflenetv2,
    vgg,
    wrn,
)
from mcl_lightning.models.heads import ProjectionHead
from mcl_lightning.models.contract import TOPOLOGIES, PeerLayout, PeerOutput, PeerSpec
from mcl_lightning.models.peers import PeerNetwork, build_peers
from mcl_lightning.models.registry import (
    StagedBackbone,
    count_parameters,
    create_backbone,
    list_backbones,
    register_backbone,
)

__all__ = [
    "PeerLayout",
    "PeerNetwork",
    "PeerOutput",
    "PeerSpec",
    "ProjectionHead",
    "StagedBackbone",
    "TOPOLOGIES",
    "build_peers",
    "count_parameters",
    "create_backbone",
    "list_backbones",
    "register_backbone",
]
