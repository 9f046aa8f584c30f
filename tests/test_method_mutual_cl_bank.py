"""Mutual CL's memory-bank variant (method.contrast=bank) against a float64 transcription of
winycg/MCL@236da2f ``losses/imagenet_sup_mcl_loss.py`` ``ContrastMemory.forward``; its index draws,
state, autocast, and a CLI run on imagenette-mini."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
import torch.nn.functional as F

from mcl_lightning.contrast import NegativeSampler
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import MutualCL
from mcl_lightning.models import PeerOutput

from conftest import attached
from test_imagenet import run_train
from test_method_mutual_cl import embed64

TERMS = ("vcl", "soft_vcl", "icl", "soft_icl")


def kl_div64(y_s, y_t, t):
    """The reference's KLDiv: F.kl_div(log_softmax(y_s/T), softmax(y_t/T), 'batchmean') * T^2."""
    return F.kl_div(F.log_softmax(y_s / t, dim=1), F.softmax(y_t / t, dim=1), reduction="batchmean") * t * t


def contrast_memory64(memories, embeddings, pos_idx, neg_idx, pos_k, neg_k, tau, t, momentum):
    """ContrastMemory.forward line by line in float64: per-pair gathers and bmm, the reference's masks
    and log(sum(exp)), then the in-place momentum update of ``memories`` (a list of (n_data, D))."""
    n, (b, d) = len(embeddings), embeddings[0].shape
    idx = torch.cat([pos_idx, neg_idx], dim=1)
    k = pos_k + neg_k + 1
    inter, soft_icl = [], 0.0
    for i in range(n):
        for j in range(i + 1, n):
            rep = memories[i].index_select(0, idx.view(-1)).detach().view(b, k, d)
            l_ij = torch.bmm(rep, embeddings[j].view(b, d, 1)).squeeze(-1) / tau
            rep = memories[j].index_select(0, idx.view(-1)).detach().view(b, k, d)
            l_ji = torch.bmm(rep, embeddings[i].view(b, d, 1)).squeeze(-1) / tau
            inter += [l_ij, l_ji]
            soft_icl = soft_icl + kl_div64(l_ij, l_ji.detach(), t) + kl_div64(l_ji, l_ij.detach(), t)
    mask = torch.zeros(b, k, dtype=torch.float64)
    mask[:, :pos_k + 1] = 1.0
    icl = 0.0
    for logit in inter:
        log_prob = logit - torch.log(torch.exp(logit).sum(1, keepdim=True))
        icl = icl - ((mask * log_prob).sum(1) / mask.sum(1)).mean()
    idx = idx[:, 1:].contiguous()
    intra = []
    for i in range(n):
        rep = memories[i].index_select(0, idx.view(-1)).detach().view(b, k - 1, d)
        intra.append(torch.bmm(rep, embeddings[i].view(b, d, 1)).squeeze(-1) / tau)
    soft_vcl = sum(kl_div64(intra[i], intra[j].detach(), t) for i in range(n) for j in range(n) if i != j)
    mask = torch.zeros(b, k - 1, dtype=torch.float64)
    mask[:, :pos_k] = 1.0
    vcl = 0.0
    for logit in intra:
        log_prob = logit - torch.log(torch.exp(logit).sum(1, keepdim=True))
        vcl = vcl - ((mask * log_prob).sum(1) / mask.sum(1)).mean()
    with torch.no_grad():
        for i in range(n):
            rows = memories[i].index_select(0, pos_idx[:, 0]) * momentum + embeddings[i] * (1 - momentum)
            memories[i].index_copy_(0, pos_idx[:, 0], rows / rows.pow(2).sum(1, keepdim=True).pow(0.5))
    return {"vcl": vcl, "soft_vcl": soft_vcl, "icl": icl, "soft_icl": soft_icl}


LABELS_ALL = torch.arange(60) % 5  # 12 training samples per class


def bank_method(n_peers, pos_k=1, neg_k=30, width=12, **options):
    method = attached(MutualCL(projection_dim=16, contrast="bank", tau=0.07, pos_k=pos_k, neg_k=neg_k, **options),
                      n_peers, width, num_classes=5)
    method.setup_data(LABELS_ALL)
    return method


def step(method, indices, seed, width=12):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(method.num_peers, len(indices), width, generator=g).requires_grad_(True)
    logits = torch.randn(method.num_peers, len(indices), 5, generator=g)
    return features, method(PeerOutput(logits, features), LABELS_ALL[indices], indices)


@pytest.mark.parametrize("n_peers, pos_k", [(2, 1), (4, 2)])
def test_terms_gradients_and_bank_update_match_contrast_memory_in_float64(n_peers, pos_k):
    torch.manual_seed(n_peers)
    method = bank_method(n_peers, pos_k=pos_k)
    step(method, torch.arange(0, 60, 3), seed=1)  # one step first: a bank of updated and initial rows
    indices = torch.tensor([1, 7, 8, 13, 22, 30, 31, 44, 50, 59])
    drawn = copy.deepcopy(method.bank.negatives)(indices, LABELS_ALL[indices])  # what the step will draw
    memories = [m.double().clone() for m in method.bank.memory_bank.memory]
    features, losses = step(method, indices, seed=2)

    f64 = features.detach().double().requires_grad_(True)
    z64 = [embed64(head, f) for head, f in zip(method.heads, f64)]
    want = contrast_memory64(memories, z64, drawn[:, :1 + pos_k], drawn[:, 1 + pos_k:], pos_k, 30, 0.07, 3.0, 0.5)
    weights = {"vcl": method.alpha, "soft_vcl": method.gamma, "icl": method.beta, "soft_icl": method.lam}
    params = list(method.heads.parameters())
    for name in TERMS:
        torch.testing.assert_close(losses[name].double(), weights[name] * want[name].detach(), rtol=1e-5, atol=1e-6,
                                   msg=name)
        got = torch.autograd.grad(losses[name], [features, *params], retain_graph=True)
        expected = torch.autograd.grad(weights[name] * want[name], [f64, *params], retain_graph=True)
        for g, w in zip(got, expected):
            scale = w.abs().max().item()
            assert scale > 0, name
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5 * scale, msg=name)
    # the banks after the step: the reference's update of the batch's rows, nothing else touched
    torch.testing.assert_close(method.bank.memory_bank.memory.double(), torch.stack(memories), rtol=0, atol=1e-6)


def test_index_columns_are_instance_same_class_then_other_class():
    sampler = NegativeSampler(50, "exact", replacement=True, seed=3, same_class=3)
    sampler.bind(LABELS_ALL)
    indices = torch.arange(60)
    idx = sampler(indices, LABELS_ALL)
    assert idx.shape == (60, 1 + 3 + 50) and torch.equal(idx[:, 0], indices)
    same = LABELS_ALL[idx[:, 1:4]]
    assert (same == LABELS_ALL[:, None]).all() and (LABELS_ALL[idx[:, 4:]] != LABELS_ALL[:, None]).all()
    assert all(len(set(row.tolist())) == 3 for row in idx[:, 1:4])  # without replacement
    assert (idx[:, 1:4] == indices[:, None]).any(1).any()  # the anchor itself may be drawn, as the reference
    # large classes take the sparse path (M draws, first distinct): same properties
    labels = torch.arange(4000) % 2
    big = NegativeSampler(8, "exact", replacement=True, same_class=4)
    big.bind(labels)
    assert big.same_class_candidates > 0
    rows = big(torch.arange(0, 4000, 7), labels[::7])[:, 1:5]
    assert (labels[rows] == labels[::7][:, None]).all() and all(len(set(r.tolist())) == 4 for r in rows)
    with pytest.raises(ConfigError, match="method.pos_k=13 exceeds the 12"):
        NegativeSampler(5, replacement=True, same_class=13).bind(LABELS_ALL)


def test_a_split_batch_equals_the_whole_batch_as_under_ddp():
    """Draws keyed by sample and per-anchor terms: two half batches (two ranks) give the whole batch's
    indices and mean terms, and updating with both halves (the all-gather) gives its banks."""
    method = bank_method(2)
    indices = torch.tensor([0, 5, 9, 14, 23, 31, 40, 47])
    ranks = [copy.deepcopy(method), copy.deepcopy(method)]
    features = torch.randn(2, 8, 12)
    logits = torch.randn(2, 8, 5)
    drawn = copy.deepcopy(method.bank.negatives)(indices, LABELS_ALL[indices])
    whole = method(PeerOutput(logits, features), LABELS_ALL[indices], indices)
    halves = []
    for rank, mine, other in zip(ranks, (slice(0, 4), slice(4, 8)), (slice(4, 8), slice(0, 4))):
        assert torch.equal(copy.deepcopy(rank.bank.negatives)(indices[mine], LABELS_ALL[indices[mine]]), drawn[mine])
        halves.append(rank(PeerOutput(logits[:, mine], features[:, mine]), LABELS_ALL[indices[mine]], indices[mine]))
        # the other rank's rows, which the all-gather in MemoryBank.update brings (disjoint rows: same result)
        rank.bank.memory_bank.update(indices[other], rank.embed(features[:, other]).detach())
    for name in TERMS:
        torch.testing.assert_close((halves[0][name] + halves[1][name]) / 2, whole[name], msg=name)
    for rank in ranks:
        torch.testing.assert_close(rank.bank.memory_bank.memory, method.bank.memory_bank.memory)


def test_banks_and_draw_position_are_checkpointed():
    method = bank_method(2)
    step(method, torch.arange(10), seed=4)
    state = method.state_dict()
    assert state["bank.memory_bank.memory"].shape == (2, 60, 16) and state["bank.negatives.stream"][1] == 1
    restored = attached(MutualCL(projection_dim=16, contrast="bank", tau=0.07, neg_k=30), 2, 12, num_classes=5)
    restored.load_state_dict(state)  # the bank takes the checkpoint's size
    restored.setup_data(LABELS_ALL)  # at fit start: binds the labels, keeps the restored rows
    assert torch.equal(restored.bank.memory_bank.memory, method.bank.memory_bank.memory)
    after, resumed = (step(m, torch.arange(10, 20), seed=5)[1] for m in (method, restored))
    assert all(torch.equal(after[name], resumed[name]) for name in TERMS)
    # the in-batch variant keeps no state beyond its projection MLPs (old checkpoints load as before)
    plain = attached(MutualCL(projection_dim=16), 2, 12, num_classes=5)
    assert all(key.startswith("heads.") for key in plain.state_dict()) and not plain.needs_train_labels


def test_bf16_autocast_scores_in_float32():
    method = bank_method(2)
    reference = copy.deepcopy(method)
    indices = torch.arange(0, 40, 4)
    features = torch.randn(2, 10, 12).bfloat16()
    logits = torch.randn(2, 10, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = method(PeerOutput(logits, features), LABELS_ALL[indices], indices)
    plain = reference(PeerOutput(logits.float(), features.float()), LABELS_ALL[indices], indices)
    for name in TERMS:
        assert losses[name].dtype == torch.float32
        torch.testing.assert_close(losses[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert method.bank.memory_bank.memory.dtype == torch.float32
    torch.testing.assert_close(method.bank.memory_bank.memory, reference.bank.memory_bank.memory)


def test_training_step_has_no_host_sync():
    """On the meta device any .item() or data-dependent shape raises."""
    method = bank_method(3, pos_k=2).to("meta")
    indices = torch.empty(8, dtype=torch.long, device="meta")
    features = torch.empty(3, 8, 12, device="meta", requires_grad=True)
    losses = method(PeerOutput(torch.empty(3, 8, 5, device="meta"), features), indices, indices)
    torch.stack(list(losses.values())).sum().backward()
    assert all(v.device.type == "meta" for v in losses.values())


def test_config_errors():
    with pytest.raises(ConfigError, match="method.contrast"):
        MutualCL(contrast="memory")
    with pytest.raises(ConfigError, match="method.pos_k must be >= 1"):
        MutualCL(contrast="bank", pos_k=0)
    with pytest.raises(ConfigError, match="method.neg_k must be >= 1"):
        MutualCL(contrast="bank", neg_k=0)
    with pytest.raises(ConfigError, match="method.bank_momentum"):
        MutualCL(contrast="bank", bank_momentum=1.0)
    method = attached(MutualCL(contrast="bank"), 2, 8)
    assert method.needs_train_labels
    with pytest.raises(RuntimeError, match="setup_data"):
        method(PeerOutput(torch.randn(2, 4, 100), torch.randn(2, 4, 8)), torch.arange(4), torch.arange(4))


def test_imagenet_recipe_cli_run_on_imagenette(tmp_path, data_root):
    """experiment=imagenet/mcl_x2_resnet18 (the bank variant) for 3 steps on the real imagenette-mini images,
    shrunk to resnet20 at 64 px and neg_k 256."""
    run_dir = tmp_path / "run"
    proc = run_train("experiment=imagenet/mcl_x2_resnet18", "backbone=resnet20", f"data.root={data_root / 'imagenette-mini'}",
                     "data.image_size=64", "data.resize_size=73", "data.batch_size=16", "data.eval_batch_size=50",
                     "data.num_workers=0", "method.neg_k=256", "trainer.max_steps=3", "trainer.limit_val_batches=1",
                     "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    method = results["config"]["method"]
    assert results["method"] == "mutual_cl" and results["peers"] == 2 and results["test"]["num_images"] == 50
    assert (method["contrast"], method["tau"], method["pos_k"], method["neg_k"]) == ("bank", 0.07, 1, 256)
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    for term in ("ce", *TERMS):
        values = [float(r[f"train/loss/{term}"]) for r in rows if r.get(f"train/loss/{term}")]
        assert values and all(v == v and v > 0 for v in values), term
