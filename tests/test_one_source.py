"""The config is the one source of truth: ``instantiate(compose("train", ...).model)`` builds the network
``python -m mcl_lightning.train`` trains (the method's reference layout is in ``model.layout``), and the
registries agree with the config groups, so that a method or a backbone is added in one place and a
missing or stale YAML fails here, naming the file."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import nn

from mcl_lightning import list_backbones, list_methods
from mcl_lightning.methods import get_method
from mcl_lightning.models import build_peers
from mcl_lightning.runtime.build import build_network

CONF = Path(__file__).resolve().parents[1] / "conf"
METHOD_FILES = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


@pytest.mark.parametrize("method", METHOD_FILES)
def test_compose_and_instantiate_builds_the_clis_network(method):
    cfg = composed(f"method={method}", "backbone=resnet20")
    instantiated = instantiate(cfg.model)
    cli_peers, cli_method = build_network(cfg)  # what train.build trains
    # independently: the network built around the method's reference layout, as the method's docs describe it
    options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in ("_target_", "layout")}
    reference = build_peers(**options, layout=instantiate(cfg.method).reference_layout)
    for net in (cli_peers, reference):
        assert shapes(instantiated) == shapes(net)
        assert sum(p.numel() for p in instantiated.parameters()) == sum(p.numel() for p in net.parameters())
        assert instantiated.topology == net.topology and instantiated.build_spec == net.build_spec


def test_one_and_okddip_branch_one_stage_later_in_the_composed_config():
    cfg = composed("method=one", "backbone=resnet20")
    assert instantiate(cfg.model).build_spec["branch_point"] == 3  # resnet20's reference point 2, + ONE's offset
    assert instantiate(composed("method=mcl_okd", "backbone=resnet20").model).build_spec["branch_point"] == 2
    assert instantiate(composed("method=one", "backbone=resnet20", "backbone.branch_point=1").model
                       ).build_spec["branch_point"] == 1  # an explicit branch point still wins


def test_every_registered_method_has_its_yaml_and_every_yaml_its_method():
    assert METHOD_FILES == list_methods(), "conf/method/<name>.yaml and @register_method(<name>) must match one to one"
    for name in METHOD_FILES:
        node = yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text())
        cls = get_method(name)
        assert get_class(node["_target_"]) is cls, f"conf/method/{name}.yaml's _target_ is not @register_method({name!r})"
        options = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert set(node) - {"_target_"} == options, f"conf/method/{name}.yaml lists {cls.__name__}'s options"


def test_every_registered_backbone_has_its_yaml_and_every_yaml_its_backbone():
    files = {p.stem: yaml.safe_load(p.read_text()) for p in (CONF / "backbone").glob("*.yaml")}
    library = {stem for stem, node in files.items() if node.get("library")}  # timm / torchvision by name
    assert library == {"timm", "torchvision"}
    assert sorted(set(files) - library) == list_backbones(), \
        "conf/backbone/<name>.yaml and @register_backbone(<name>) must match one to one"
    for stem in set(files) - library:
        assert files[stem] == {"name": stem, "branch_point": None}, f"conf/backbone/{stem}.yaml"
