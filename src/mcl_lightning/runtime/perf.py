"""Speed switches that leave the training maths alone: ``perf.*`` in the configs.

    python -m mcl_lightning.train perf=gpu_fast                 # the fast single-GPU configuration
    python -m mcl_lightning.train perf.channels_last=true perf.compile=default

| key | effect | same results as without? |
| --- | --- | --- |
| ``fuse_peers`` | identical peers run as one grouped network (``models/fused.py``); ``auto``: when they can be (else the loop, logged) | yes, up to float rounding (tests) |
| ``channels_last`` | peers' weights and input in NHWC (cuDNN's fast layout, above all with bf16) | yes, up to float rounding |
| ``compile`` | ``torch.compile`` of the peers: ``false``, ``true``/``default``, ``reduce-overhead`` (CUDA graphs: needs static shapes, so ``data.drop_last=true``), ``max-autotune``... | yes, up to float rounding |
| ``compile_backend`` | ``inductor`` (default), or ``aot_eager`` / ``eager`` (debugging; what CPU tests use) | |
| ``compile_method`` | ``torch.compile`` of the method's forward too | values up to rounding; inductor draws its own random numbers, so negatives differ from eager under one seed (set ``torch._inductor.config.fallback_random = True`` for eager's) |

``data.device_resident`` (the training set on the GPU) and the trainer's precision (bf16 autocast;
the contrastive term stays float32) are set by ``perf=gpu_fast`` too; see conf/perf/gpu_fast.yaml.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods.base import OKDMethod
from mcl_lightning.models.fused import FusedPeerNetwork
from mcl_lightning.models.peers import PeerNetwork

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FUSE_CHOICES = (False, True, "auto")

log = logging.getLogger("mcl_lightning")


@dataclass(frozen=True)
class PerfOptions:
    """See the module docstring."""

    fuse_peers: bool | str = False
    channels_last: bool = False
    compile: bool | str = False
    compile_backend: str = "inductor"
    compile_method: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | "PerfOptions" | None) -> "PerfOptions":
        if config is None:
            return cls()
        if isinstance(config, PerfOptions):
            return config
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"unknown perf option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(config))

    @property
    def compile_mode(self) -> str | None:
        """None (no compile) or the torch.compile mode."""
        value = self.compile
        if value is False or value is None or (isinstance(value, str) and value.lower() in ("false", "none", "off")):
            return None
        if value is True or (isinstance(value, str) and value.lower() in ("true", "on")):
            return "default"
        if value not in COMPILE_MODES:
            raise ConfigError(f"perf.compile={value!r}: choose false, true or one of {', '.join(COMPILE_MODES)}")
        return str(value)


def _channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    if isinstance(x, Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def apply_perf(
    peers: PeerNetwork | FusedPeerNetwork, method: OKDMethod, options: Mapping[str, Any] | PerfOptions | None
) -> tuple[PeerNetwork | FusedPeerNetwork, OKDMethod]:
    """The peers (possibly a new, fused module) and the method with ``options`` applied.

    Call before the optimiser exists (``OKDSystem`` builds it later): fusing makes new parameters.
    ``compile`` uses ``nn.Module.compile`` (in place), so parameter names and checkpoints are
    unchanged.
    """
    opts = PerfOptions.from_config(options)
    mode = opts.compile_mode  # validates
    if opts.fuse_peers not in FUSE_CHOICES:
        raise ConfigError(f"perf.fuse_peers={opts.fuse_peers!r}: choose false, true or auto")
    if opts.fuse_peers and not isinstance(peers, FusedPeerNetwork):
        try:
            peers = FusedPeerNetwork.from_peers(peers)
        except ConfigError as error:  # auto: what cannot be fused (CL-ILR's pair stage, mixed backbones) loops
            if opts.fuse_peers != "auto":
                raise
            log.info("perf.fuse_peers=auto: the peers run one by one (%s)", error)
    if opts.channels_last:
        peers.to(memory_format=torch.channels_last)
        peers.register_forward_pre_hook(_channels_last_input)
    if mode is not None:
        compile_module(peers, opts)
        if opts.compile_method:
            compile_module(method, opts)
    return peers, method


def compile_module(module: nn.Module, options: PerfOptions) -> None:
    """``module.compile`` (in place) with the options' mode and backend; nothing when compile is off."""
    mode = options.compile_mode
    if mode is None:
        return
    # modes are inductor settings; other backends (aot_eager, eager: debugging, CPU tests) take none
    kwargs = {"mode": mode} if options.compile_backend == "inductor" else {}
    module.compile(backend=options.compile_backend, **kwargs)


def describe(options: Mapping[str, Any] | PerfOptions | None) -> dict[str, Any]:
    """The options as plain values (for results and benchmark JSON)."""
    opts = PerfOptions.from_config(options)
    return {f.name: getattr(opts, f.name) for f in fields(opts)} | {"compile": opts.compile_mode or False}
