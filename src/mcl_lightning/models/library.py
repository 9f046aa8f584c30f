"""Any timm or torchvision classification network as a backbone: ``timm:<name>``, ``torchvision:<name>``.

    backbone=timm backbone.name=mobilenetv3_small_100        peers=[resnet32,timm:mobilenetv3_small_100]
    backbone=torchvision backbone.name=mobilenet_v3_small   backbone.pretrained=/path/to/weights.pth

The library builds the network (its own initialisation); ``pretrained`` loads a local weights file,
never a download; a classifier of another width than ``num_classes`` is left out of the loading. The
network's final linear layer becomes the peer's classifier and the rest, that layer replaced by an
identity, one stage giving the pooled features: these peers train as independent networks (nothing is
split off to share), and export gives back the library's own module with the trained weights.
Images reach the network at the data set's own size (CIFAR 32x32, ImageNet crops 224x224): nothing is
resized and no stem is changed; the networks' global pooling takes any input of at least 32x32.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.models.staged import StagedBackbone
from mcl_lightning.core.registry import Registry

LibraryFactory = Callable[..., nn.Module]
LIBRARIES: Registry[LibraryFactory] = Registry("backbone library", example="backbone=timm backbone.name=resnet18")


def is_library_name(name: str) -> bool:
    """``timm:<model>`` / ``torchvision:<model>`` (registry backbones have no colon)."""
    return ":" in name


def check_library_peers(names: list[str], topology: str | None, branch_point: int | None,
                        pretrained: str | None) -> bool:
    """Whether any peer is a library network; those train independent, and only they take ``pretrained``."""
    library = [name for name in names if is_library_name(name)]
    if library and (topology == "shared_trunk" or branch_point not in (None, 0)):
        raise ConfigError(f"{library[0]} trains as independent peers only (a timm or torchvision network is "
                          "not split into stages to share); leave topology= and backbone.branch_point= unset")
    if pretrained is not None and len(library) != len(names):
        raise ConfigError("backbone.pretrained loads weights into timm: or torchvision: networks only; "
                          "leave it unset for the registry backbones")
    return bool(library)


class LibraryBackbone(StagedBackbone):
    """A library network as one stage (the network, its final linear layer replaced by an identity)
    plus that linear layer as the classifier. ``deployable()`` puts the layer back."""

    def __init__(self, network: nn.Module, num_classes: int) -> None:
        path = final_linear(network, num_classes)
        classifier = network.get_submodule(path)
        _replace(network, path, nn.Identity())
        super().__init__([network], nn.Identity(), classifier, classifier.in_features, branch_point=0)
        self.classifier_path = path

    def deployable(self) -> nn.Module:
        network = copy.deepcopy(self.stages[0])
        _replace(network, self.classifier_path, copy.deepcopy(self.classifier))
        return network


def final_linear(network: nn.Module, num_classes: int) -> str:
    """The dotted name of the network's last ``nn.Linear`` to ``num_classes`` outputs."""
    names = [name for name, m in network.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not names:
        raise ConfigError(f"{type(network).__name__} has no final nn.Linear to {num_classes} classes to train as a "
                          "peer; choose a classification network (a linear classifier head) for backbone.name=")
    return names[-1]


def _replace(network: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, leaf, module)


def create_library_backbone(name: str, num_classes: int = 100, pretrained: str | None = None) -> LibraryBackbone:
    """``timm:<model>`` or ``torchvision:<model>`` as a backbone, optionally from local weights."""
    library, model = name.split(":", 1)
    if pretrained is not None and not Path(str(pretrained)).expanduser().is_file():
        raise ConfigError(f"backbone.pretrained={pretrained} is not a file; pass a local weights file "
                          "(nothing is downloaded), or leave it unset for the library's random initialisation")
    network = LIBRARIES.get(library)(model, num_classes=num_classes, pretrained=pretrained)
    return LibraryBackbone(network, num_classes)


@LIBRARIES.register("timm")
def timm_network(model: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"backbone timm:{model} needs timm: pip install \"mcl-lightning[timm]\"") from None
    if not timm.is_model(model):
        raise ConfigError(f"unknown timm model {model!r}; pick a name from timm.list_models(), e.g. "
                          "backbone.name=mobilenetv3_small_100 or resnet18")
    if pretrained is None:
        return timm.create_model(model, pretrained=False, num_classes=num_classes)
    # timm's own loader: a local file instead of the hub; it drops a classifier of another width.
    return timm.create_model(model, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay={"file": str(Path(pretrained).expanduser())})


@LIBRARIES.register("torchvision")
def torchvision_network(model: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    from torchvision import models

    if model not in models.list_models(module=models):
        raise ConfigError(f"unknown torchvision classification model {model!r}; pick a name from "
                          "torchvision.models.list_models(torchvision.models), e.g. backbone.name=mobilenet_v3_small")
    network = models.get_model(model, weights=None, num_classes=num_classes)
    if pretrained is not None:
        load_matching(network, Path(pretrained).expanduser(), classifier=final_linear(network, num_classes))
    return network


def load_matching(network: nn.Module, path: Path, classifier: str) -> None:
    """A torchvision state dict into ``network``, leaving out a classifier of another width."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = network.state_dict()
    skipped = {k for k in state if k.startswith(classifier + ".") and k in own and state[k].shape != own[k].shape}
    missing, unexpected = network.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    wrong = [k for k in missing if not k.startswith(classifier + ".")] + list(unexpected)
    if wrong:
        raise ConfigError(f"backbone.pretrained={path} does not fit this network ({len(wrong)} keys differ, e.g. "
                          f"{wrong[0]}); pass weights saved from the same torchvision model")
