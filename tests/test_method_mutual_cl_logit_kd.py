"""Mutual CL's logit distillation (``method.logit_distill=true``) against float64 transcriptions of the two
reference scripts, winycg/MCL@236da2f ``main_imagenet.py:142-159`` and ``main_cifar.py:158-169``, with the
method built from composed configs as ``train`` builds it (``build_network``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import MutualCL
from mcl_lightning.models import PeerOutput
from mcl_lightning.runtime.validation import user_error
from mcl_lightning.train import build_network

RECIPE = "imagenet/mcl_x4_logit_kd_resnet18"


def distill_kl64(y_s, y_t, t):
    """``utils.py:122-132`` DistillKL, in float64."""
    p_s = F.log_softmax(y_s / t, dim=1)
    p_t = F.softmax(y_t / t, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * (t**2)


def ensemble64(logits):
    """The ensemble both scripts build the same way (``main_imagenet.py:145-150``, ``main_cifar.py:158-161``)."""
    ensemble_logits = 0.0
    for i in range(len(logits)):
        ensemble_logits = ensemble_logits + logits[i]
    return ensemble_logits / (len(logits))


def main_imagenet_logit_kd64(logits, t):
    """``main_imagenet.py:142-153``: the ensemble is not detached; only ``logits[-1]`` is distilled."""
    loss_logit_kd = torch.tensor(0.0, dtype=torch.float64)
    ensemble_logits = ensemble64(logits)
    loss_logit_kd = loss_logit_kd + distill_kl64(logits[-1], ensemble_logits, t)
    return loss_logit_kd


def main_cifar_logit_kd64(logits, t):
    """``main_cifar.py:158-169``: the ensemble is detached; both networks distilled if N = 2, else the last."""
    loss_logit_kd = torch.tensor(0.0, dtype=torch.float64)
    ensemble_logits = ensemble64(logits).detach()
    if len(logits) == 2:
        loss_logit_kd = loss_logit_kd + distill_kl64(logits[0], ensemble_logits, t)
        loss_logit_kd = loss_logit_kd + distill_kl64(logits[1], ensemble_logits, t)
    else:
        loss_logit_kd = loss_logit_kd + distill_kl64(logits[-1], ensemble_logits, t)
    return loss_logit_kd


def _compose(overrides):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def _check_term(method, logits, reference, features=None, labels=None):
    """``logit_kd`` from the method's forward, its value and its gradient with respect to every peer's
    logits, against ``reference`` on the same logits in float64."""
    batch = logits.shape[1]
    labels = torch.arange(batch) % logits.shape[2] if labels is None else labels
    if features is None:
        features = torch.randn(logits.shape[0], batch, method.heads[0].net[0].in_features)
    losses = method(PeerOutput(logits, features), labels, torch.arange(batch))
    l64 = logits.detach().double().requires_grad_(True)
    want = reference(list(l64), method.kd_temperature)
    torch.testing.assert_close(losses["logit_kd"].double(), want.detach(), rtol=1e-6, atol=1e-7)
    (got,) = torch.autograd.grad(losses["logit_kd"], logits)
    (expected,) = torch.autograd.grad(want, l64)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * scale)
    return got


@pytest.mark.parametrize("n_peers", [2, 4])
def test_imagenet_recipe_trains_main_imagenets_logit_kd_term(n_peers, data_root):
    """The recipe as composed and built by ``train``: the loss and its gradient with respect to the logits
    equal ``main_imagenet.py``'s to float32 precision; every peer gets a gradient (the teacher is not detached)."""
    cfg = _compose([f"experiment={RECIPE}", f"data.root={data_root / 'imagenette-mini'}", f"peers={n_peers}"])
    peers, method = build_network(cfg)
    assert (method.logit_distill, method.logit_kd_students, method.logit_kd_detach_teacher) == (True, "last", False)
    classes, batch = peers.spec().num_classes, 6
    method.setup_data(torch.arange(40) % classes)  # the bank variant's rows: one per (stand-in) training sample
    g = torch.Generator().manual_seed(n_peers)
    logits = (torch.randn(n_peers, batch, classes, generator=g) * 3).requires_grad_(True)
    grad = _check_term(method, logits, main_imagenet_logit_kd64)
    assert all(grad[i].abs().max() > 0 for i in range(n_peers))
    # the term this recipe trained before (the CIFAR defaults) is not the reference's: the check tells them apart
    method.logit_kd_students, method.logit_kd_detach_teacher = "pair_or_last", True
    with pytest.raises(AssertionError):
        _check_term(method, logits, main_imagenet_logit_kd64)


@pytest.mark.parametrize("n_peers", [2, 4])
def test_default_is_main_cifars_logit_kd_term(n_peers):
    """``method=mutual_cl method.logit_distill=true`` keeps the CIFAR term: a detached teacher, both peers
    distilled if N = 2, else only the last (the only peer with a gradient)."""
    cfg = _compose(["method=mutual_cl", "backbone=resnet20", f"peers={n_peers}", "method.logit_distill=true"])
    peers, method = build_network(cfg)
    assert (method.logit_kd_students, method.logit_kd_detach_teacher) == ("pair_or_last", True)
    g = torch.Generator().manual_seed(10 + n_peers)
    logits = (torch.randn(n_peers, 6, peers.spec().num_classes, generator=g) * 3).requires_grad_(True)
    grad = _check_term(method, logits, main_cifar_logit_kd64)
    students = {0, 1} if n_peers == 2 else {n_peers - 1}
    assert {i for i in range(n_peers) if grad[i].abs().max() > 0} == students


@pytest.mark.parametrize("option, value, message", [
    ("logit_kd_students", "first", "unknown method.logit_kd_students 'first'; choose one of: pair_or_last, last"),
    ("logit_kd_detach_teacher", "no", "method.logit_kd_detach_teacher must be true or false, got 'no'"),
    ("logit_distill", "false", "method.logit_distill must be true or false, got 'false'"),
])
def test_bad_logit_kd_options_are_one_config_error(option, value, message):
    with pytest.raises(ConfigError) as error:
        MutualCL(**{option: value})
    assert str(error.value) == message


def test_a_bad_flag_from_the_command_line_is_the_same_one_line_error():
    """Hydra reads ``=yes`` as a string, which ``bool()`` would take for true; ``train`` prints this line, exit 2."""
    cfg = _compose(["method=mutual_cl", "backbone=resnet20", "method.logit_kd_detach_teacher=yes"])
    with pytest.raises(Exception) as error:
        build_network(cfg)
    assert str(user_error(error.value)) == "method.logit_kd_detach_teacher must be true or false, got 'yes'"


@pytest.mark.parametrize("method, option", [("okddip", "detach_targets"), ("mcl_okd", "negatives_with_replacement")])
def test_every_on_off_method_option_refuses_a_string(method, option):
    """OKDDip's and MCL-OKD's on/off options take true/false only, as mutual CL's do."""
    cfg = _compose([f"method={method}", "backbone=resnet20", f"method.{option}=no"])
    with pytest.raises(Exception) as error:
        build_network(cfg)
    assert str(user_error(error.value)) == f"method.{option} must be true or false, got 'no'"
