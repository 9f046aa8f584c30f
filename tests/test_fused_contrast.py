"""The one-pass contrastive loss (contrast/fused.py) and the sampler's first-occurrence table,
against the plain autograd formula and against the distribution they claim."""

from __future__ import annotations


import pytest
import torch

from mcl_lightning.contrast import MemoryBank, NegativeSampler, Workspace, fused_multi_view_nce, multi_view_nce
from mcl_lightning.methods import MCLOKD

from conftest import attached


def _state(n_peers, k, batch=7, n_data=300, dim=32, seed=0, duplicates=False):
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n_peers, n_data, dim, generator=g), dim=-1)
    z = torch.nn.functional.normalize(torch.randn(n_peers, batch, dim, generator=g), dim=-1)
    if duplicates:
        idx = torch.randint(0, n_data, (batch, k + 1), generator=g)
    else:
        idx = torch.stack([torch.randperm(n_data, generator=g)[: k + 1] for _ in range(batch)])
    return bank, z, idx


@pytest.mark.parametrize("n_peers", [2, 3, 4])
@pytest.mark.parametrize("scoring", ["gather", "dense"])
@pytest.mark.parametrize("duplicates", [False, True])
def test_fused_loss_and_gradient_equal_the_autograd_formula(n_peers, scoring, duplicates):
    bank, z, idx = _state(n_peers, k=150, duplicates=duplicates)
    tau, n_data = 0.07, bank.shape[1]
    z_ref = z.clone().requires_grad_(True)
    expected = multi_view_nce(bank[:, idx], z_ref, tau, n_data)
    expected.backward()
    z_fused = z.clone().requires_grad_(True)
    source = bank[:, idx] if scoring == "gather" else bank
    workspace = Workspace()
    for _ in range(2):  # the second call reuses the workspace's buffers
        z_fused.grad = None
        loss = fused_multi_view_nce(z_fused, source, idx, tau, n_data, scoring=scoring, workspace=workspace)
        (2.5 * loss).backward()
        torch.testing.assert_close(loss, expected, rtol=2e-6, atol=1e-5)
        # both are float32: entries that cancel differ by rounding (about 1e-6 of the largest entry)
        scale = z_ref.grad.abs().max()
        torch.testing.assert_close(z_fused.grad, 2.5 * z_ref.grad, rtol=1e-4, atol=1e-5 * scale)


def test_fused_loss_keeps_nothing_of_the_scores_for_backward():
    """Only dL/dz (N x B x D) is saved: the banks may change in place before backward."""
    bank, z, idx = _state(3, k=40)
    z = z.requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused_multi_view_nce(z, bank, idx, 0.1, bank.shape[1], scoring="dense")
    assert saved == [z.shape]
    before = z.grad
    bank.add_(1.0)  # an in-place bank update between forward and backward changes nothing
    loss.backward()
    assert before is None and torch.isfinite(z.grad).all()


def test_fused_loss_needs_two_peers_and_a_known_scoring():
    bank, z, idx = _state(2, k=5)
    with pytest.raises(ValueError, match="two peers"):
        fused_multi_view_nce(z[:1], bank[:1], idx, 0.1, 300)
    with pytest.raises(ValueError, match="scoring"):
        fused_multi_view_nce(z, bank, idx, 0.1, 300, scoring="sparse")


def test_method_path_equals_the_autograd_formula_in_both_scorings():
    """MCLOKD.contrastive (heads, sampler, fused loss, bank update) against the plain formula on the
    same negatives, for gather and dense scoring, twice in a row (workspace reuse)."""
    labels_all = torch.arange(600) % 10
    for mode in ("gather", "dense"):
        torch.manual_seed(0)
        method = attached(MCLOKD(nce_k=200, projection_dim=16, bank_scoring=mode), 3, 12)
        method.setup_data(labels_all)
        for step in range(2):
            features = torch.randn(3, 8, 12, requires_grad=True)
            indices = torch.arange(8) * 7 + step
            bank = method.memory_bank.memory.clone()
            stream = method.negatives.stream.clone()  # the sampler's (seed, step): rewind it to redraw
            idx = method.negatives(indices, labels_all[indices])
            method.negatives.stream.copy_(stream)
            loss = method.contrastive(features, labels_all[indices], indices)
            loss.backward()
            f_ref = features.detach().clone().requires_grad_(True)
            z = torch.stack([head(f) for head, f in zip(method.heads, f_ref)])
            expected = multi_view_nce(bank[:, idx], z, method.tau, 600)
            expected.backward()
            torch.testing.assert_close(loss, expected, rtol=2e-6, atol=1e-5)
            torch.testing.assert_close(features.grad, f_ref.grad, rtol=1e-4, atol=1e-5 * f_ref.grad.abs().max())


def test_memory_bank_gather_into_a_buffer():
    bank = MemoryBank(3, 50, 8)
    idx = torch.randint(0, 50, (4, 6))
    out = torch.full((3 * 24 * 8,), float("nan"))
    rows = bank.gather(idx, out=out)
    assert rows.data_ptr() == out.data_ptr() and torch.equal(rows, bank.gather(idx))


def test_one_pass_and_autograd_paths_of_the_method_agree():
    """MCLOKD uses the one-pass loss on one process with float32 banks and the autograd path
    otherwise (DDP: global normaliser; half-precision banks): the same loss, gradients and banks."""
    from conftest import attached

    from mcl_lightning.methods import MCLOKD

    labels_all = torch.arange(500) % 10
    features = torch.randn(3, 8, 12)
    results = []
    for one_pass in (True, False):
        torch.manual_seed(0)
        method = attached(MCLOKD(nce_k=40, projection_dim=16), 3, 12)
        method.setup_data(labels_all)
        method._one_pass = lambda z, flag=one_pass: flag  # noqa: E731  (force the path)
        f = features.clone().requires_grad_(True)
        loss = method.contrastive(f, labels_all[:8], torch.arange(8))
        loss.backward()
        results.append((loss.detach(), f.grad, method.memory_bank.memory.clone()))
    (l1, g1, m1), (l2, g2, m2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m1, m2)


def test_first_distinct_keeps_the_first_k_distinct_values_in_order_with_or_without_a_table():
    from mcl_lightning.contrast.negatives import _EMPTY, first_distinct

    values = torch.tensor([[3, 3, 1, 4, 1, 5, 9, 2, 6], [0, 0, 0, 7, 7, 1, 0, 2, 8]])
    assert first_distinct(values, 4, 10).tolist() == [[3, 1, 4, 5], [0, 7, 1, 2]]
    table = torch.full((2 * 10,), _EMPTY, dtype=torch.int32)
    assert first_distinct(values, 4, 10, table).tolist() == [[3, 1, 4, 5], [0, 7, 1, 2]]
    assert (table == _EMPTY).all()  # the scratch is left clean for the next call
    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 1000, (16, 900), generator=g)
    table = torch.full((16 * 1000,), _EMPTY, dtype=torch.int32)
    with_table, sorted_way = first_distinct(big, 300, 1000, table), first_distinct(big, 300, 1000)
    assert torch.equal(with_table, sorted_way)  # the batch size (which picks the way) never matters
    for row, picked in zip(big.tolist(), with_table.tolist()):
        assert picked == list(dict.fromkeys(row))[:300]


def test_sampler_rows_do_not_depend_on_the_batch_around_them():
    """Keyed draws: an anchor's negatives are the same alone, in a batch, or in a batch too large
    for the first-position table (which then sorts)."""
    from mcl_lightning.contrast import negatives

    labels_all = torch.arange(3000) % 10
    sampler = NegativeSampler(k=200)
    sampler.bind(labels_all)
    assert sampler.mode == "sparse"
    indices = torch.arange(0, 3000, 37)
    big = sampler(indices, labels_all[indices])
    sampler.stream[1] -= 1
    alone = sampler(indices[5:6], labels_all[indices[5:6]])
    assert torch.equal(alone[0], big[5])
    sampler.stream[1] -= 1
    limit = negatives.FIRST_POSITION_TABLE_LIMIT
    try:
        negatives.FIRST_POSITION_TABLE_LIMIT = 0  # force the sorting way
        assert torch.equal(sampler(indices, labels_all[indices]), big)
    finally:
        negatives.FIRST_POSITION_TABLE_LIMIT = limit
    assert all(len(set(row)) == 200 for row in big[:, 1:].tolist())
    assert (labels_all[big[:, 1:]] != labels_all[indices][:, None]).all()
