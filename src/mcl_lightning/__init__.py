"""mcl-lightning: online knowledge distillation (MCL-OKD and friends) for PyTorch Lightning.

Public API::

    from mcl_lightning import OKDSystem, PeerNetwork, MCLOKD, CIFARDataModule
    from mcl_lightning.callbacks import NonFiniteLossGuard, LastCheckpoint  # the command line's callbacks

``mcl_lightning.tools`` (benchmark, study, report) is the command line's tooling, not part of this API.
"""

from mcl_lightning.data import CIFARDataModule
from mcl_lightning.core.errors import ConfigError, DatasetIntegrityError, DatasetNotFoundError, UserError
from mcl_lightning.methods import MCLOKD, Independent, OKDMethod, get_method, list_methods, register_method
from mcl_lightning.models import (
    PeerNetwork,
    PeerOutput,
    ProjectionHead,
    StagedBackbone,
    count_parameters,
    create_backbone,
    list_backbones,
    register_backbone,
)
from mcl_lightning.system import OKDSystem

__version__ = "0.1.0"

__all__ = [
    "CIFARDataModule",
    "ConfigError",
    "DatasetIntegrityError",
    "DatasetNotFoundError",
    "Independent",
    "MCLOKD",
    "OKDMethod",
    "OKDSystem",
    "PeerNetwork",
    "PeerOutput",
    "ProjectionHead",
    "StagedBackbone",
    "UserError",
    "count_parameters",
    "create_backbone",
    "get_method",
    "list_backbones",
    "list_methods",
    "register_backbone",
    "register_method",
]
