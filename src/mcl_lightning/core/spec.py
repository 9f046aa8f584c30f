"""What a checkpoint needs to rebuild its method without Hydra: the class and its constructor options.

Every ``OKDMethod`` subclass records the arguments it was constructed with (``record_init_options``
runs from ``OKDMethod.__init_subclass__``); ``method_spec`` turns them into plain data for the
checkpoint and ``build_method`` constructs the same method again.

    spec = method_spec(MCLOKD(nce_k=256))   # {"target": "mcl_lightning.methods.mcl_okd.MCLOKD", "options": {...}}
    method = build_method(spec)
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from mcl_lightning.core.errors import ConfigError

_OPTIONS = "_init_options"
_PLAIN = (str, int, float, bool, type(None))


def record_init_options(cls: type) -> None:
    """Wrap ``cls.__init__`` (if it defines one) so that the outermost call records its arguments."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_records_options", False):
        return
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if _OPTIONS not in self.__dict__:  # the most-derived constructor: the caller's own arguments
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            options: dict[str, Any] = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    options.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    options[f"*{name}"] = list(value)
                else:
                    options[name] = value
            self.__dict__[_OPTIONS] = options
        init(self, *args, **kwargs)

    __init__._records_options = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


def init_options(module: nn.Module) -> dict[str, Any]:
    """The keyword arguments ``module`` was constructed with (empty if not recorded)."""
    return dict(module.__dict__.get(_OPTIONS, {}))


def _plain(value: Any) -> bool:
    if isinstance(value, (DictConfig, ListConfig)):  # Hydra passes list/dict options as these
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _to_plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def method_spec(method: nn.Module) -> dict[str, Any] | None:
    """``{"target": "module.Class", "options": {...}}``, or None when an option is not plain data."""
    options = init_options(method)
    if any(name.startswith("*") for name in options) or not _plain(options):
        return None
    cls = type(method)
    return {"target": f"{cls.__module__}.{cls.__qualname__}", "options": _to_plain(options)}


def build_method(spec: dict[str, Any]) -> nn.Module:
    """Construct the method a ``method_spec`` describes."""
    target = spec["target"]
    module_name, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"the checkpoint's method {target} cannot be imported ({error}); put its module on PYTHONPATH"
        ) from error
    return cls(**spec["options"])
