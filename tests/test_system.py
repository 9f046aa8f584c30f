"""The LightningModule on real data: reproducibility, checkpoint/resume, schedule."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from mcl_lightning import CIFARDataModule, MCLOKD, OKDSystem, PeerNetwork
from mcl_lightning.core.errors import ConfigError


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def build(data_root, seed=0, nce_k=64, peers=3):
    L.seed_everything(seed, workers=True)
    datamodule = CIFARDataModule(root=data_root, batch_size=32, eval_batch_size=128)
    net = PeerNetwork.from_backbone("resnet20", num_peers=peers, num_classes=100)
    return datamodule, OKDSystem(net, MCLOKD(nce_k=nce_k), num_classes=100)


def trainer(tmp_path, steps=4, epochs=1, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=steps, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **kwargs,
    )


def test_same_seed_gives_identical_losses(tmp_path, data_root):
    runs = []
    for _ in range(2):
        datamodule, system = build(data_root)
        recorder = RecordLosses()
        trainer(tmp_path, callbacks=[recorder], enable_checkpointing=False).fit(system, datamodule=datamodule)
        runs.append(torch.stack(recorder.losses))
    assert len(runs[0]) == 4
    assert torch.equal(runs[0], runs[1])


def test_checkpoint_then_resume_restores_banks_and_heads_bit_for_bit(tmp_path, data_root):
    datamodule, system = build(data_root)
    first = trainer(tmp_path, steps=3)
    first.fit(system, datamodule=datamodule)
    path = tmp_path / "state.ckpt"
    first.save_checkpoint(path)
    saved = {k: v.clone() for k, v in system.method.state_dict().items()}
    assert saved["memory_bank.memory"].shape == (3, 50_000, 128)

    # 1) load_from_checkpoint into freshly built (differently seeded) modules
    _, fresh = build(data_root, seed=1)
    assert not torch.equal(fresh.method.heads[0].linear.weight, saved["heads.0.linear.weight"])
    restored = OKDSystem.load_from_checkpoint(path, peers=fresh.peers, method=fresh.method)
    for key, value in restored.method.state_dict().items():
        assert torch.equal(value, saved[key]), key

    # 2) resuming a fit (Trainer(ckpt_path=...)) restores them too, after setup re-initialised the banks
    datamodule, again = build(data_root, seed=2)
    resumed = trainer(tmp_path, steps=3)
    resumed.fit(again, datamodule=datamodule, ckpt_path=path)  # epoch 1 of 1 already done: restore only
    for key, value in again.method.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert resumed.current_epoch == 1 and len(again.val_history) == len(system.val_history) == 1


def test_banks_change_only_during_training(tmp_path, data_root):
    datamodule, system = build(data_root)
    trainer(tmp_path, steps=2, enable_checkpointing=False).fit(system, datamodule=datamodule)
    before = system.method.memory_bank.memory.clone()
    trainer(tmp_path, enable_checkpointing=False).validate(system, datamodule=datamodule)
    assert torch.equal(before, system.method.memory_bank.memory)


def test_cosine_schedule_is_the_reference_per_epoch_formula(tmp_path, data_root):
    datamodule, system = build(data_root)
    lrs = []

    class RecordLR(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer(tmp_path, steps=1, epochs=3, callbacks=[RecordLR()], enable_checkpointing=False).fit(
        system, datamodule=datamodule
    )
    assert lrs == pytest.approx([0.5 * 0.05 * (1 + math.cos(math.pi * e / 3)) for e in range(3)])


def test_the_system_attaches_the_method_and_checks_what_it_needs():
    net = PeerNetwork.from_backbone("resnet20", num_peers=2)
    method = MCLOKD(nce_k=8)
    OKDSystem(net, method)
    assert method.spec == net.spec() and [h.linear.in_features for h in method.heads] == [64, 64]
    with pytest.raises(ConfigError, match="needs peers >= 2, got 1"):
        OKDSystem(PeerNetwork.from_backbone("resnet20", num_peers=1), MCLOKD())
    with pytest.raises(TypeError, match=r"method must be an OKDMethod instance, e.g. MCLOKD\(nce_k=256\); got the class MCLOKD"):
        OKDSystem(net, MCLOKD)
    with pytest.raises(TypeError, match=r"peers must be a PeerNetwork \(or FusedPeerNetwork\) instance.*; got Sequential"):
        OKDSystem(torch.nn.Sequential(), MCLOKD())


def test_resumed_run_continues_exactly_like_an_uninterrupted_one(tmp_path, data_root):
    """Banks, heads, optimiser, schedule and the RNGs (negatives, crops, shuffling) all restored."""
    datamodule, system = build(data_root)
    straight = RecordLosses()
    trainer(tmp_path / "a", steps=3, epochs=2, callbacks=[straight], enable_checkpointing=False).fit(
        system, datamodule=datamodule
    )

    class Interrupt(L.Callback):  # the same 2-epoch run, stopped after its first epoch
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    datamodule, first = build(data_root)
    part = trainer(tmp_path / "b", steps=3, epochs=2, callbacks=[Interrupt()], enable_checkpointing=False)
    part.fit(first, datamodule=datamodule)
    assert part.current_epoch == 1
    part.save_checkpoint(tmp_path / "epoch0.ckpt")

    datamodule, resumed = build(data_root, seed=3)  # different init: everything must come from the file
    continued = RecordLosses()
    trainer(tmp_path / "c", steps=3, epochs=2, callbacks=[continued], enable_checkpointing=False).fit(
        resumed, datamodule=datamodule, ckpt_path=tmp_path / "epoch0.ckpt"
    )
    assert len(straight.losses) == 6 and len(continued.losses) == 3
    assert torch.equal(torch.stack(straight.losses[3:]), torch.stack(continued.losses))
    for key, value in system.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key


def test_optimizer_is_the_reference_sgd_over_peers_and_heads(data_root):
    _, system = build(data_root)
    system.hparams.scheduler = "constant"  # the cosine schedule needs a trainer for max_epochs
    optimizer = system.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    peers_group, heads_group = optimizer.param_groups  # the peers, then the method's default group
    for group in (peers_group, heads_group):  # one SGD setting for all, weight decay on heads too
        assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.05, 0.9, 5e-4, True)
    assert [id(p) for p in peers_group["params"]] == [id(p) for p in system.peers.parameters()]
    assert [id(p) for p in heads_group["params"]] == [id(p) for p in system.method.heads.parameters()]
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert len(params) == len(list(system.parameters()))


def test_the_optimizer_is_foreach_and_steps_bit_for_bit_as_the_per_parameter_loop():
    """foreach SGD: a few multi-tensor ops per group instead of a few per parameter; on the CPU the
    same elementwise maths as the loop, so the weights after several steps are identical."""
    L.seed_everything(0)
    system = OKDSystem(PeerNetwork.from_backbone("resnet8", num_peers=2, num_classes=10), MCLOKD(nce_k=8),
                       scheduler="constant")
    optimizer = system.configure_optimizers()["optimizer"]
    assert optimizer.defaults["foreach"] is True
    looped_params = [[p.detach().clone().requires_grad_() for p in g["params"]] for g in optimizer.param_groups]
    looped = torch.optim.SGD([{"params": ps} for ps in looped_params],
                             **{k: optimizer.defaults[k] for k in ("lr", "momentum", "weight_decay", "nesterov")},
                             foreach=False)
    for _ in range(3):
        for group, copies in zip(optimizer.param_groups, looped_params):
            for p, q in zip(group["params"], copies):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
        optimizer.step()
        looped.step()
    for group, copies in zip(optimizer.param_groups, looped_params):
        assert all(torch.equal(p, q) for p, q in zip(group["params"], copies))


def test_export_a_deployable_peer_from_a_checkpoint(tmp_path, data_root):
    from mcl_lightning import create_backbone
    from mcl_lightning.export import export_peer, main

    datamodule, system = build(data_root)
    fit = trainer(tmp_path, steps=2, enable_checkpointing=False)
    fit.fit(system, datamodule=datamodule)
    fit.save_checkpoint(tmp_path / "run.ckpt")
    deployed = export_peer(tmp_path / "run.ckpt", peer=2)
    x = torch.randn(4, 3, 32, 32)
    system.eval()
    torch.testing.assert_close(deployed(x), system.peers(x).logits[2])
    main([str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "peer.pt")])  # the last peer
    plain = create_backbone("resnet20", num_classes=100)
    plain.load_state_dict(torch.load(tmp_path / "peer.pt", weights_only=True))
    torch.testing.assert_close(plain.eval()(x), system.peers(x).logits[-1])
