"""Every published recipe (`experiment=`): it composes, builds its model, and follows its source.

Experiments live under conf/experiment/<dataset>/. An experiment naming a method or data config that
does not exist would be composed with the missing group swapped for an existing one, so that
everything else it sets (backbone, peers, topology, recipe, reference) is still checked, and its
full composition skipped, naming what is missing, until the config exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mcl_lightning.methods import OKDMethod
from mcl_lightning.models import PeerNetwork, count_parameters
from mcl_lightning.runtime.overrides import check_group_options
from mcl_lightning.train import build_network

from conftest import find_data_root

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml"))
# The CPU proxy study's recipes (docs/results.md): this library's own, with no published numbers.
PROXIES = [e for e in EXPERIMENTS if e.startswith("cifar100/proxy_")]
PUBLISHED = [e for e in EXPERIMENTS if e not in PROXIES]
STAND_INS = {"method": "independent", "data": "cifar100"}  # used while a named config does not exist yet
# Former names, kept as aliases when experiments were grouped by dataset.
ALIASES = {
    "mcl_okd_cifar100_resnet32": "cifar100/mcl_okd_resnet32",
    "mcl_okd_cifar100_resnet110": "cifar100/mcl_okd_resnet110",
    "baseline_cifar100_resnet32": "cifar100/baseline_resnet32",
}


def chosen(experiment: str, group: str) -> str | None:
    """The option ``experiment``'s file picks for ``group`` (following an alias to its target)."""
    for entry in OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").get("defaults", []):
        if isinstance(entry, str) and entry.startswith("/experiment/"):
            return chosen(entry.removeprefix("/experiment/"), group)
        if isinstance(entry, DictConfig) and f"override /{group}" in entry:
            return entry[f"override /{group}"]
    return None


def missing_groups(experiment: str) -> dict[str, str]:
    picks = {group: chosen(experiment, group) for group in STAND_INS}
    return {g: o for g, o in picks.items() if o is not None and not (CONF / g / f"{o}.yaml").is_file()}


def compose_experiment(experiment: str, stand_ins: bool = False) -> DictConfig:
    overrides = [f"experiment={experiment}"]
    if chosen(experiment, "data") == "imagenet":  # ImageNet-style folders: the class count comes from them
        root = find_data_root()
        if root is None:
            pytest.skip("real data not found: set MCL_DATA_ROOT or put it at ../shared/data")
        overrides.append(f"data.root={root / 'imagenette-mini'}")
    if stand_ins:
        overrides += [f"{group}={STAND_INS[group]}" for group in missing_groups(experiment)]
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    check_group_options(cfg)  # every key it sets is an option of its group (what the entry point checks first)
    return cfg


def build(cfg: DictConfig) -> tuple[PeerNetwork, OKDMethod]:
    return build_network(cfg)


def topology(cfg: DictConfig, method: OKDMethod) -> str:
    """The experiment's topology: its own, or (null) the method's reference layout's."""
    return cfg.topology or method.reference_layout.topology


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment):
    missing = missing_groups(experiment)
    if missing:
        pytest.skip("needs " + ", ".join(f"{g}={o}" for g, o in missing.items()) + " (not in this library yet)")
    cfg = compose_experiment(experiment)
    peers, method = build(cfg)
    assert isinstance(method, OKDMethod) and method.name == chosen(experiment, "method")
    assert peers.num_peers == cfg.peers and peers.topology == topology(cfg, method)
    assert peers.export_peer(0).classifier.out_features == cfg.data.num_classes
    assert cfg.backbone.name == chosen(experiment, "backbone")


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if missing_groups(e)])
def test_experiments_waiting_for_a_config_build_everything_else(experiment):
    cfg = compose_experiment(experiment, stand_ins=True)
    peers, method = build(cfg)
    assert peers.num_peers == cfg.peers and peers.topology == topology(cfg, method)
    assert cfg.backbone.name == chosen(experiment, "backbone")


@pytest.mark.parametrize("experiment", PUBLISHED)
def test_every_experiment_names_its_source_and_published_numbers(experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    cfg = compose_experiment(experiment, stand_ins=True)
    ref = cfg.reference
    assert ref.source.startswith(("winycg/MCL-OKD@5de042a README", "winycg/MCL@236da2f README"))
    assert ("python main_" in text) or ("/experiment/" in text)  # the reference command, or an alias
    published = ref.get("top1_error") or ref.get("top1_accuracy")
    assert 0 < published.peer < 100 and ref.metric and ref.selection


def test_aliases_are_the_renamed_experiments():
    for old, new in ALIASES.items():
        assert compose_experiment(old) == compose_experiment(new)


def _recipe(cfg: DictConfig) -> tuple:
    return (cfg.data.batch_size, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.scheduler, cfg.trainer.max_epochs)


@pytest.mark.parametrize("experiment", PUBLISHED)
def test_recipes_follow_the_repository_that_produced_the_number(experiment):
    cfg = compose_experiment(experiment, stand_ins=True)
    name = experiment.split("/")[-1]
    method = chosen(experiment, "method")
    if experiment.startswith("cifar100/mcl_okd_") or experiment in ("mcl_okd_cifar100_resnet32", "mcl_okd_cifar100_resnet110"):
        # main_cifar_mcl_okd.py; README K: 16384 for VGG-16 and HCGNet-A1, 256 otherwise
        assert method == "mcl_okd" and (cfg.peers, cfg.topology) == (4, "shared_trunk")
        assert _recipe(cfg) == (64, 0.05, 5e-4, "cosine", 300) and cfg.method.tau == 0.1
        assert cfg.method.nce_k == (16384 if name.endswith(("vgg16", "hcgnet_a1")) else 256)
        assert cfg.method.alpha == (0.0 if "_mcl_only_" in name else 1.0)
    elif experiment.startswith("cifar100/baseline_") or experiment == "baseline_cifar100_resnet32":
        assert method == "independent" and cfg.peers == 1  # main_cifar_baseline.py: one network
        assert _recipe(cfg) == (128, 0.1, 5e-4, "cosine", 300)
    elif experiment.startswith("cifar100/mcl_"):  # winycg/MCL main_cifar.py
        assert _recipe(cfg) == (128, 0.1, 5e-4, "cosine", 300)
        if name.startswith("mcl_baseline_"):
            assert method == "independent" and (cfg.peers, cfg.topology) == (2, "independent")
        else:
            assert method == "mutual_cl"
            # winycg/MCL@236da2f main_cifar.py:49: --tau 0.1 since e81472e; the scripts pass none
            assert (cfg.method.contrast, cfg.method.tau) == ("batch", 0.1)
            assert cfg.method.logit_distill == name.startswith("mcl_x4_logit_kd_")
            # main_cifar.py:158-169's logit KD: detached teacher, both peers if N = 2 (the defaults)
            assert (cfg.method.logit_kd_students, cfg.method.logit_kd_detach_teacher) == ("pair_or_last", True)
            n = 2 if name.startswith("mcl_x2_") else 4  # N = 2: independent networks, else branched
            assert (cfg.peers, cfg.topology) == (n, "independent" if n == 2 else "shared_trunk")
    elif method in ("dml", "cl_ilr", "one", "okddip"):  # main_cifar_<method>.py, method.md §10.2
        assert experiment == f"cifar100/{method}_{name.removeprefix(method + '_')}"
        assert (cfg.peers, cfg.topology) == (4, None)  # the method's reference layout
        assert _recipe(cfg) == (128, 0.1, 5e-4, "cosine", 300) and cfg.reference.top1_error.ensemble
    elif experiment == "imagenet/mcl_okd_resnet34":  # main_imagenet_mcl_okd.py
        assert method == "mcl_okd" and (cfg.peers, cfg.topology) == (4, "shared_trunk")
        assert _recipe(cfg) == (128, 0.05, 1e-4, "cosine", 100)
        assert (cfg.method.nce_k, cfg.method.tau, cfg.method.negatives_with_replacement) == (16384, 0.07, True)
    elif experiment.startswith("imagenet/mcl_"):  # winycg/MCL main_imagenet.py
        assert method == "mutual_cl" and chosen(experiment, "data") == "imagenet"
        # the ImageNet loss (ContrastMemory), main_imagenet.py:56-59 defaults
        m = cfg.method
        assert (m.contrast, m.tau, m.neg_k, m.pos_k, m.bank_momentum) == ("bank", 0.07, 8192, 1, 0.5)
        assert m.logit_distill == name.startswith("mcl_x4_logit_kd_")
        if m.logit_distill:  # main_imagenet.py:145-153: the last peer only, teacher not detached
            assert (m.logit_kd_students, m.logit_kd_detach_teacher) == ("last", False)
        assert _recipe(cfg) == (256, 0.1, 1e-4, "multistep", 90) and list(cfg.optim.milestones) == [30, 60, 90]
        n = 2 if name.startswith("mcl_x2_") else 4
        assert (cfg.peers, cfg.topology) == (n, "independent" if n == 2 else "shared_trunk")
    else:
        pytest.fail(f"{experiment}: no recipe check for this family; add one")


def test_every_table_row_has_its_experiment():
    okd_rows = ["densenet40_12", "resnet32", "vgg16", "resnet110", "hcgnet_a1"]
    mcl_rows = ["resnet32", "resnet56", "resnet110", "wrn_16_2", "wrn_40_2", "hcgnet_a1", "shufflenetv2_0_5",
                "shufflenetv2_1_0"]
    logit_rows = ["wrn_16_2", "wrn_40_2", "wrn_28_4", "shufflenetv2_1_0", "hcgnet_a2"]
    kinds = ("mcl_okd", "mcl_okd_mcl_only", "baseline", "dml", "cl_ilr", "one", "okddip")  # the table's columns
    expected = {f"cifar100/{kind}_{row}" for row in okd_rows for kind in kinds}
    expected |= {f"cifar100/mcl_{n}_{row}" for row in mcl_rows for n in ("x2", "x4")}
    expected |= {f"cifar100/mcl_x4_logit_kd_{row}" for row in logit_rows}
    expected |= {f"cifar100/mcl_baseline_{row}" for row in sorted(set(mcl_rows) | set(logit_rows))}
    expected |= {"imagenet/mcl_okd_resnet34", "imagenet/mcl_x2_resnet18", "imagenet/mcl_x4_resnet18",
                 "imagenet/mcl_x2_resnet34", "imagenet/mcl_x4_resnet34", "imagenet/mcl_x4_logit_kd_resnet18"}
    assert set(PUBLISHED) == expected | set(ALIASES)


def test_the_papers_resnet110_is_the_bottleneck_network_everywhere():
    for experiment in [e for e in EXPERIMENTS if "resnet110" in e]:
        cfg = compose_experiment(experiment, stand_ins=True)
        assert cfg.backbone.name == "resnet110_bottleneck", experiment
        assert count_parameters(instantiate(cfg.model).export_peer(0)) == 1_170_868


PROXY_VARIANTS = {  # name -> (method, peers, alpha, beta)
    "proxy_independent": ("independent", 4, None, None), "proxy_single": ("independent", 1, None, None),
    "proxy_shared_trunk": ("independent", 4, None, None),
    "proxy_dml": ("dml", 4, 1.0, None), "proxy_mcl_okd": ("mcl_okd", 4, 1.0, 0.025),
    "proxy_mcl_okd_no_teacher": ("mcl_okd", 4, 0.0, 0.025), "proxy_mcl_okd_no_contrast": ("mcl_okd", 4, 1.0, 0.0),
}


def test_the_proxy_study_has_every_variant_of_docs_results_on_one_recipe():
    """docs/results.md's variants; run_proxy_study.sh runs exactly these; one recipe for all of them."""
    assert sorted(PROXIES) == sorted(f"cifar100/{name}" for name in PROXY_VARIANTS)
    script = (CONF.parent / "docs" / "results" / "run_proxy_study.sh").read_text()
    listed = script.split('VARIANTS="${VARIANTS:-', 1)[1].split("}", 1)[0].split()
    assert sorted(listed) == sorted(PROXY_VARIANTS)
    for name, (method, peers, alpha, beta) in PROXY_VARIANTS.items():
        cfg = compose_experiment(f"cifar100/{name}")
        assert chosen(f"cifar100/{name}", "method") == method and cfg.peers == peers and cfg.backbone.name == "resnet8"
        assert _recipe(cfg) == (128, 0.1, 5e-4, "cosine", 5) and cfg.reference is None
        assert cfg.data.dataset == "cifar100" and cfg.data.val_split == 0
        assert cfg.topology == ("shared_trunk" if name == "proxy_shared_trunk" else None)  # else the method's own
        if alpha is not None:
            assert cfg.method.alpha == alpha
        if beta is not None:
            assert (cfg.method.beta, cfg.method.nce_k, cfg.method.tau) == (beta, 256, 0.1)


def test_mcl_recipes_compose_with_the_references_contrast():
    """Issue 18: CIFAR at winycg/MCL's τ = 0.1 in-batch, every ImageNet recipe on the memory-bank variant."""
    cfg = compose_experiment("cifar100/mcl_x2_resnet32")
    assert (cfg.method.tau, cfg.method.contrast) == (0.1, "batch")
    for experiment in [e for e in EXPERIMENTS if e.startswith("imagenet/mcl_x")]:
        _, method = build(compose_experiment(experiment))
        assert (method.contrast, method.tau, method.neg_k, method.pos_k) == ("bank", 0.07, 8192, 1), experiment
        assert method.needs_train_labels and method.bank.negatives.replacement


def test_every_cited_winycg_repository_names_its_commit():
    """A stored copy of a reference file is not necessarily its newest version: each citation says which."""
    cited = re.compile(r"winycg/[A-Za-z0-9_.-]*[A-Za-z0-9_-]")
    sources = [*(CONF / "experiment").rglob("*.yaml"), *(CONF.parent / "docs" / "methods").glob("*.md")]
    missing = []
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if path.suffix == ".yaml" and "#" not in line and "source:" not in line:
                continue
            missing += [f"{path.name}:{number}" for m in cited.finditer(line)
                        if not re.match(r"@[0-9a-f]{7,40}\b", line[m.end():])]
    assert not missing, missing
