"""perf.* switches: compiled and channels_last peers against eager, options, the perf=gpu_fast config."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_module

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import MCLOKD
from mcl_lightning.models import PeerNetwork
from mcl_lightning.models.fused import FusedPeerNetwork
from mcl_lightning.runtime.perf import PerfOptions, apply_perf, describe

from test_train import TINY, run_train


def _peers(topology="shared_trunk", dtype=torch.float32):
    torch.manual_seed(0)
    return PeerNetwork.from_backbone("resnet20", 2, topology, 10).to(dtype)


def _step(peers, method, x, labels, indices, seed=5):
    torch.manual_seed(seed)
    out = peers(x)
    losses = method(out, labels, indices)
    loss = torch.stack(list(losses.values())).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peers.named_parameters()}
    return out, {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("compile_method", [False, True])
def test_compiled_peers_and_method_equal_eager(compile_method):
    """torch.compile with the aot_eager backend (AOTAutograd's traced forward and backward graphs,
    without inductor's code generation, which needs minutes of C++ compilation on CPU: the slow test
    below runs it). The method's random draws run in eager's order there, so the losses match too."""
    labels_all = torch.arange(300) % 10
    eager = _peers()
    compiled = copy.deepcopy(eager)
    methods = []
    for peers in (eager, compiled):
        method = MCLOKD(nce_k=16, projection_dim=8)
        torch.manual_seed(1)
        method.attach(peers.spec())
        method.setup_data(labels_all)
        methods.append(method)
    compiled, methods[1] = apply_perf(compiled, methods[1], {"compile": True, "compile_backend": "aot_eager",
                                                             "compile_method": compile_method})
    x = torch.randn(6, 3, 16, 16)
    indices = torch.arange(6) * 11
    results = [_step(p, m, x, labels_all[indices], indices) for p, m in zip((eager, compiled), methods)]
    (out_e, loss_e, grad_e), (out_c, loss_c, grad_c) = results
    torch.testing.assert_close(out_c.logits, out_e.logits, rtol=1e-5, atol=1e-6)
    for name in loss_e:
        torch.testing.assert_close(loss_c[name], loss_e[name], rtol=1e-5, atol=1e-6)
    for name in grad_e:
        torch.testing.assert_close(grad_c[name], grad_e[name], rtol=1e-4, atol=1e-5 * grad_e[name].abs().max())
    torch.testing.assert_close(methods[1].memory_bank.memory, methods[0].memory_bank.memory)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged: checkpoints are too


def test_channels_last_and_fused_peers_equal_eager():
    eager = _peers("independent", torch.float64)
    fast, _ = apply_perf(copy.deepcopy(eager), MCLOKD(), {"channels_last": True, "fuse_peers": True})
    assert isinstance(fast, FusedPeerNetwork)
    conv = fast.fused_branch[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fast(x).logits, eager(x).logits, rtol=1e-10, atol=1e-12)


def test_fuse_peers_auto_fuses_identical_peers_and_loops_the_rest(caplog):
    """``perf.fuse_peers=auto`` (the study's setting): fused where it can be, equal to the loop; peers
    that cannot be fused (different backbones) stay the loop, logged, where ``true`` stops."""
    eager = _peers("shared_trunk", torch.float64)
    fused, _ = apply_perf(copy.deepcopy(eager), MCLOKD(), {"fuse_peers": "auto"})
    assert isinstance(fused, FusedPeerNetwork)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x).logits, eager(x).logits, rtol=1e-10, atol=1e-12)
    mixed = PeerNetwork.from_backbone(["resnet8", "resnet20"], topology="independent", num_classes=10)
    with caplog.at_level("INFO", logger="mcl_lightning"):
        kept, _ = apply_perf(mixed, MCLOKD(), {"fuse_peers": "auto"})
    assert kept is mixed and "perf.fuse_peers=auto: the peers run one by one" in caplog.text
    with pytest.raises(ConfigError, match="perf.fuse_peers"):
        apply_perf(mixed, MCLOKD(), {"fuse_peers": True})
    with pytest.raises(ConfigError, match="choose false, true or auto"):
        apply_perf(mixed, MCLOKD(), {"fuse_peers": "sometimes"})


def test_options_are_checked():
    assert PerfOptions.from_config(None) == PerfOptions()
    assert PerfOptions(compile=True).compile_mode == "default" and PerfOptions(compile="false").compile_mode is None
    assert PerfOptions(compile="reduce-overhead").compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="perf.compile"):
        PerfOptions(compile="fastest").compile_mode
    with pytest.raises(ConfigError, match="unknown perf option"):
        PerfOptions.from_config({"compile": True, "cuda_graphs": True})
    assert describe({"compile": True})["compile"] == "default"


def test_gpu_fast_config_composes():
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        fast = compose("train", overrides=["perf=gpu_fast"])
        default = compose("train")
    assert fast.perf.compile == "reduce-overhead" and fast.perf.channels_last and not fast.perf.fuse_peers
    assert fast.data.device_resident and fast.data.drop_last
    assert fast.trainer.precision == "bf16-mixed" and fast.trainer.accelerator == "gpu" and fast.trainer.benchmark
    assert not default.perf.compile and not default.data.device_resident and default.trainer.precision == "32-true"
    PerfOptions.from_config(dict(fast.perf)).compile_mode  # every key known, the mode valid


@pytest.mark.slow  # each switch has its equality test above; the CLI wiring in make test-all
def test_perf_switches_through_the_entry_point(tmp_path, data_root):
    """A CPU run with every switch that runs on a CPU: fused peers, channels_last, compile (aot_eager),
    the training set 'resident' on the training device; results and checkpoints as usual."""
    run_dir = tmp_path / "run"
    proc = run_train("peers=2", "backbone=resnet20", "method=mcl_okd", "method.nce_k=64", "topology=independent",
                     f"data.root={data_root}", f"hydra.run.dir={run_dir}", "trainer=cpu",
                     "perf.fuse_peers=true", "perf.channels_last=true", "perf.compile=true",
                     "perf.compile_backend=aot_eager", "data.device_resident=true", "data.drop_last=true", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["perf"]["fuse_peers"] and results["topology"] == "independent"
    checkpoint = torch.load(results["checkpoints"]["last"], map_location="cpu", weights_only=False)
    assert "peers.branches.1.0.0.weight" in checkpoint["state_dict"]  # the per-peer layout, as unfused runs
    from mcl_lightning.export import export_peer

    plain = export_peer(results["checkpoints"]["last"], peer=1)
    assert type(plain).__name__ == "StagedBackbone"


@pytest.mark.slow
def test_inductor_compiled_peers_equal_eager():
    """The real compiler (C++ code generation: about 1.5 minutes on 2 CPU cores)."""
    eager = _peers()
    compiled, _ = apply_perf(copy.deepcopy(eager), MCLOKD(), {"compile": True})
    x = torch.randn(4, 3, 16, 16)
    out_e, out_c = eager(x), compiled(x)
    torch.testing.assert_close(out_c.logits, out_e.logits, rtol=1e-4, atol=1e-5)
    out_e.logits.sum().backward(), out_c.logits.sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4 * p.grad.abs().max(), msg=name)
