"""MCL-OKD's contrastive machinery against float64 computations written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mcl_lightning.contrast import MemoryBank, NegativeSampler, multi_view_nce
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import MCLOKD
from mcl_lightning.models import PeerNetwork, PeerOutput
from mcl_lightning.system import OKDSystem

from conftest import attached, meta_training_step


def reference_mcl_loss(bank, z, contrast_idx, tau, eps=1e-7):
    """method.md §4.4-4.7, one ordered pair at a time, in float64.

    bank: (N, N_data, D) memory banks; z: (N, B, D) embeddings; contrast_idx: (B, K + 1).
    """
    n_peers, n_data, _ = bank.shape
    k = contrast_idx.shape[1] - 1
    pn = 1.0 / n_data
    total = 0.0
    for a in range(n_peers):
        for b in range(n_peers):
            if a == b:
                continue
            rows = bank[a][contrast_idx]  # (B, K + 1, D): peer a's bank
            s = torch.exp(torch.einsum("bkd,bd->bk", rows, z[b]) / tau)  # peer b's embedding
            big_z = (s.mean() * n_data).detach()  # per-batch partition estimate, no gradient
            p = s / big_z
            term = torch.log(p[:, 0] / (p[:, 0] + k * pn + eps))
            term = term + torch.log(k * pn / (p[:, 1:] + k * pn + eps)).sum(1)
            total = total - term.sum() / len(term)
    return total


def _random_state(n_peers, k, batch=6, n_data=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.rand(n_peers, n_data, dim, generator=g) * 0.3 - 0.15
    z = torch.nn.functional.normalize(torch.randn(n_peers, batch, dim, generator=g), dim=-1)
    idx = torch.randint(0, n_data, (batch, k + 1), generator=g)
    return bank, z, idx


@pytest.mark.parametrize("n_peers", [2, 3, 4])
@pytest.mark.parametrize("k", [5, 24])
def test_contrastive_loss_and_gradient_match_float64_formula(n_peers, k):
    bank, z, idx = _random_state(n_peers, k)
    z32 = z.clone().requires_grad_(True)
    loss = multi_view_nce(bank[:, idx], z32, tau=0.1, num_samples=bank.shape[1])
    loss.backward()
    z64 = z.double().requires_grad_(True)
    expected = reference_mcl_loss(bank.double(), z64, idx, tau=0.1)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_peers", [2, 3, 4])
def test_method_contrastive_term_scores_before_updating_the_banks(n_peers):
    """The whole MCLOKD path (heads, sampler, gather, NCE, update) against the float64 formula."""
    torch.manual_seed(0)
    n_data, k, batch, c = 60, 7, 5, 12
    labels_all = torch.arange(n_data) % 6
    method = attached(MCLOKD(projection_dim=16, nce_k=k), n_peers, c)
    method.setup_data(labels_all)
    bank_before = method.memory_bank.memory.clone()
    indices = torch.tensor([3, 17, 22, 41, 58])
    labels = labels_all[indices]
    features = torch.randn(n_peers, batch, c, requires_grad=True)

    stream = method.negatives.stream.clone()  # the sampler's (seed, step): rewind it to redraw
    contrast_idx = method.negatives(indices, labels)
    method.negatives.stream.copy_(stream)
    loss = method.contrastive(features, labels, indices)
    loss.backward()

    f64 = features.detach().double().requires_grad_(True)
    z = []
    for head, f in zip(method.heads, f64):
        w, b = head.linear.weight.double(), head.linear.bias.double()
        e = f @ w.T + b
        z.append(e / e.norm(dim=1, keepdim=True))
    expected = reference_mcl_loss(bank_before.double(), torch.stack(z), contrast_idx, tau=0.1)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features.grad.double(), f64.grad, rtol=1e-4, atol=1e-6)

    # Bank update (method.md §4.8): m <- normalise(0.5 m + 0.5 z) at the batch's indices only.
    z_now = torch.stack(z).detach().float()
    updated = 0.5 * bank_before[:, indices] + 0.5 * z_now
    updated = updated / updated.norm(dim=-1, keepdim=True)
    after = method.memory_bank.memory
    torch.testing.assert_close(after[:, indices], updated, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(n_data, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(after[:, untouched], bank_before[:, untouched])


def test_memory_bank_initialisation_and_update_rule():
    torch.manual_seed(0)
    bank = MemoryBank(num_peers=2, num_samples=1000, dim=128, momentum=0.5)
    bound = 1 / math.sqrt(128 / 3)
    assert bank.memory.shape == (2, 1000, 128)
    assert bank.memory.abs().max() <= bound and bank.memory.abs().max() > 0.9 * bound
    norms = bank.memory.norm(dim=-1)
    assert abs(norms.mean().item() - 1.0) < 0.05  # norm about 1, not normalised
    old = bank.memory.clone()
    idx = torch.tensor([5, 7])
    z = torch.nn.functional.normalize(torch.randn(2, 2, 128), dim=-1)
    bank.update(idx, z)
    expected = 0.5 * old[:, idx] + 0.5 * z
    torch.testing.assert_close(bank.memory[:, idx], expected / expected.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(bank.memory[:, idx].norm(dim=-1), torch.ones(2, 2))


def _cifar_like_labels(n_classes=10, per_class=50):
    g = torch.Generator().manual_seed(1)
    return torch.arange(n_classes).repeat_interleave(per_class)[torch.randperm(n_classes * per_class, generator=g)]


@pytest.mark.parametrize("positive", ["exact", "relax"])
@pytest.mark.parametrize("replacement", [False, True])
def test_negatives_never_share_the_anchor_class(positive, replacement):
    labels_all = _cifar_like_labels()
    sampler = NegativeSampler(k=400, positive=positive, replacement=replacement)
    sampler.bind(labels_all)
    indices = torch.arange(0, 500, 7)
    idx = sampler(indices, labels_all[indices])
    assert idx.shape == (len(indices), 401) and idx.dtype == torch.long
    assert (idx >= 0).all() and (idx < 500).all()
    anchors = labels_all[indices][:, None]
    assert (labels_all[idx[:, 1:]] != anchors).all()
    if positive == "exact":
        assert torch.equal(idx[:, 0], indices)
    else:
        assert (labels_all[idx[:, 0]] == anchors[:, 0]).all()
    if not replacement:  # distinct within a row, as the reference on CIFAR
        assert all(len(set(row.tolist())) == 400 for row in idx[:, 1:])


def test_negatives_cover_the_whole_pool_uniformly():
    labels_all = _cifar_like_labels()
    sampler = NegativeSampler(k=30)
    sampler.bind(labels_all)
    anchors = (labels_all == labels_all[0]).nonzero().squeeze(1)  # the 50 samples of one class
    rows = torch.cat([sampler(anchors, labels_all[anchors]) for _ in range(40)])  # 40 steps: 2000 rows
    counts = torch.bincount(rows[:, 1:].flatten(), minlength=500)
    own_class = labels_all == labels_all[0]
    assert counts[own_class].sum() == 0
    others = counts[~own_class].float()  # 450 candidates, expected 2000 * 30 / 450 = 133 each
    assert others.min() > 80 and others.max() < 200


def test_same_seed_gives_the_same_negatives():
    """Negatives are keyed by (seed, step, sample): not by torch's RNG, nor by the rest of the batch."""
    labels_all = _cifar_like_labels()
    sampler = NegativeSampler(k=64, positive="relax", seed=7)
    sampler.bind(labels_all)
    indices = torch.arange(32)
    torch.manual_seed(0)
    first = sampler(indices, labels_all[indices])
    other = sampler(indices, labels_all[indices])  # the next step draws afresh
    again = NegativeSampler(k=64, positive="relax", seed=7)
    again.bind(labels_all)
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(again(indices, labels_all[indices]), first) and not torch.equal(first, other)
    half = NegativeSampler(k=64, positive="relax", seed=7)
    half.bind(labels_all)  # a rank holding half of the batch draws exactly those rows
    assert torch.equal(half(indices[16:], labels_all[indices[16:]]), first[16:])
    seed8 = NegativeSampler(k=64, positive="relax", seed=8)
    seed8.bind(labels_all)
    assert not torch.equal(seed8(indices, labels_all[indices]), first)


def test_k_larger_than_the_negative_pool_is_a_clear_error():
    labels_all = _cifar_like_labels()  # 450 negatives per anchor
    NegativeSampler(k=450).bind(labels_all)
    with pytest.raises(ConfigError, match="nce_k=451 exceeds the 450 negatives"):
        NegativeSampler(k=451).bind(labels_all)
    NegativeSampler(k=451, replacement=True).bind(labels_all)  # allowed with replacement
    with pytest.raises(ConfigError, match="nce_k"):
        attached(MCLOKD(nce_k=1000), 2, 16).setup_data(labels_all)


def test_contrastive_loss_under_bf16_autocast_matches_float32():
    torch.manual_seed(0)
    labels_all = _cifar_like_labels()
    peers = PeerNetwork.from_backbone("resnet20", num_peers=3, num_classes=10)
    method = MCLOKD(nce_k=64)
    method.attach(peers.spec())
    method.setup_data(labels_all)
    x = torch.randn(8, 3, 32, 32)
    indices = torch.arange(8)
    labels = labels_all[indices]
    bank, stream = method.memory_bank.memory.clone(), method.negatives.stream.clone()
    with torch.no_grad():
        fp32 = method(peers(x), labels, indices)
        method.memory_bank.memory.copy_(bank)
        method.negatives.stream.copy_(stream)  # the same negatives again
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = peers(x)
            assert output.features.dtype == torch.bfloat16
            bf16 = method(output, labels, indices)
    for name in fp32:
        assert torch.isfinite(bf16[name]), name
        assert bf16[name].dtype == torch.float32
    rel = abs(bf16["contrastive"] - fp32["contrastive"]) / fp32["contrastive"]
    assert rel < 1e-2
    total32, total16 = sum(fp32.values()), sum(bf16.values())
    assert torch.isfinite(total16) and abs(total16 - total32) / total32 < 1e-2


def test_online_teacher_kd_targets_last_or_all_peers():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 10, requires_grad=True)
    output = PeerOutput(logits, torch.randn(3, 4, 8))
    last = attached(MCLOKD(nce_k=4, online_teacher_targets="last"), 3, 8)
    kd = last.online_teacher_kd(output.logits)
    kd.backward()
    assert logits.grad[:2].abs().sum() == 0 and logits.grad[2].abs().sum() > 0  # teacher detached
    teacher = logits.detach().mean(0)
    p_t = torch.softmax(teacher / 3, -1)
    expected = 9 * (p_t * (p_t.log() - torch.log_softmax(logits[2].detach() / 3, -1))).sum(-1).mean()
    torch.testing.assert_close(kd.detach(), expected)
    every = attached(MCLOKD(nce_k=4, online_teacher_targets="all"), 3, 8).online_teacher_kd(logits.detach())
    assert every > kd.detach()
    with pytest.raises(ConfigError, match="online_teacher_targets"):
        MCLOKD(online_teacher_targets="first")
    with pytest.raises(ConfigError, match="peers >= 2"):
        attached(MCLOKD(), 1, 8)


def test_training_path_never_reads_values_back_to_the_host():
    """On the meta device every data-dependent shape or .item() raises: the step has no host sync.

    (On a GPU that is what keeps the step free of synchronisations; CPU tests cannot see syncs.)
    """
    labels_all = _cifar_like_labels()
    peers = PeerNetwork.from_backbone("resnet20", num_peers=3, num_classes=10)
    for positive, replacement in (("exact", False), ("relax", True)):
        method = MCLOKD(nce_k=32, positive=positive, negatives_with_replacement=replacement)
        method.attach(peers.spec())
        method.setup_data(labels_all)  # at setup time, before training: reading labels is fine there
        meta_training_step(peers, method)


def test_ddp_duplicates_write_one_deterministic_row(monkeypatch):
    """DistributedSampler padding repeats samples across ranks: all copies take the first one's row."""
    from mcl_lightning.contrast import memory_bank as mb

    def fake_two_rank_gather(tensor):  # rank 1 saw the same indices with other embeddings
        other = tensor if tensor.dtype == torch.long else tensor + 1.0
        return torch.cat([tensor, other], dim=0 if tensor.dim() == 1 else 1)

    monkeypatch.setattr(mb, "_all_gather_cat", fake_two_rank_gather)
    torch.manual_seed(0)
    bank = MemoryBank(num_peers=2, num_samples=10, dim=4, momentum=0.5)
    old = bank.memory.clone()
    idx = torch.tensor([1, 3])
    z = torch.nn.functional.normalize(torch.randn(2, 2, 4), dim=-1)
    bank.update(idx, z)
    expected = 0.5 * old[:, idx] + 0.5 * z  # the first occurrence (this rank's), not rank 1's
    torch.testing.assert_close(bank.memory[:, idx], expected / expected.norm(dim=-1, keepdim=True))


def test_contrastive_loss_under_fp16_autocast_stays_float32_and_finite():
    torch.manual_seed(0)
    labels_all = _cifar_like_labels()
    method = attached(MCLOKD(nce_k=64), 3, 64)
    method.setup_data(labels_all)
    features = torch.randn(3, 8, 64) * 5  # large logits: exp(s / tau) would overflow in fp16
    indices = torch.arange(8)
    bank = method.memory_bank.memory.clone()
    stream = method.negatives.stream.clone()
    with torch.no_grad():
        fp32 = method.contrastive(features, labels_all[indices], indices)
        method.memory_bank.memory.copy_(bank)
        method.negatives.stream.copy_(stream)  # the same negatives again
        with torch.autocast("cpu", dtype=torch.float16):
            fp16 = method.contrastive(features.half(), labels_all[indices], indices)
    assert fp16.dtype == torch.float32 and torch.isfinite(fp16)
    assert abs(fp16 - fp32) / fp32 < 1e-2


def test_each_bank_is_gathered_once_per_step(monkeypatch):
    labels_all = _cifar_like_labels()
    method = attached(MCLOKD(nce_k=8), 4, 16)
    method.setup_data(labels_all)
    calls = []
    original = MemoryBank.gather

    def counting_gather(self, indices, **kwargs):
        calls.append(indices.shape)
        return original(self, indices, **kwargs)

    monkeypatch.setattr(MemoryBank, "gather", counting_gather)
    method.contrastive(torch.randn(4, 6, 16), labels_all[:6], torch.arange(6))
    assert calls == [torch.Size([6, 9])]  # one indexing call returns all N = 4 banks' rows
    assert original(method.memory_bank, torch.zeros(6, 9, dtype=torch.long)).shape == (4, 6, 9, 128)


def test_shape_mismatches_are_one_clear_message():
    """A method attached to one network cannot be handed another: one check, one ConfigError."""
    peers = PeerNetwork.from_backbone("resnet20", num_peers=2, num_classes=10)
    method = attached(MCLOKD(nce_k=4), 2, 128)  # resnet20 gives 64-d features
    with pytest.raises(ConfigError, match="already attached to a network of 2 peers with feature widths \\(128, 128\\)"):
        OKDSystem(peers, method)
    unpooled = PeerNetwork([torch.nn.Conv2d(3, 4, 3)], [torch.nn.Linear(4, 10)], feature_dims=[4])
    with pytest.raises(ValueError, match="pooled"):
        unpooled(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("n_peers", [2, 4])
def test_dense_bank_scoring_equals_gathering_rows(n_peers):
    """bank_scoring=dense (one GEMM over the bank) gives the gather path's loss, gradients and banks."""
    labels_all = _cifar_like_labels()
    features = torch.randn(n_peers, 8, 12)
    results = []
    for mode in ("gather", "dense"):
        torch.manual_seed(0)
        method = attached(MCLOKD(nce_k=300, projection_dim=16, bank_scoring=mode), n_peers, 12)
        method.setup_data(labels_all)
        f = features.clone().requires_grad_(True)
        torch.manual_seed(1)
        loss = method.contrastive(f, labels_all[:8], torch.arange(8))
        loss.backward()
        results.append((loss.detach(), f.grad, method.memory_bank.memory.clone()))
    (l1, g1, m1), (l2, g2, m2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)  # same math, another summation order
    torch.testing.assert_close(m1, m2)
    auto = attached(MCLOKD(nce_k=300), 2, 12)
    auto.setup_data(labels_all)  # 500 samples: 8 anchors x 301 rows > 4 x 500 -> dense
    assert auto._dense_scoring(torch.Size([8, 301])) and not auto._dense_scoring(torch.Size([2, 301]))
