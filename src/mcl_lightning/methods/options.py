"""The option checks most methods share, each a one-line ``ConfigError`` naming the option
(``method.<name>``), so that every method words the same mistake the same way."""

from __future__ import annotations

from mcl_lightning.core.errors import ConfigError


def check_positive(**values: float) -> None:
    """Temperatures and the like: each > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"method.{name} must be > 0, got {value}")


def check_loss_weights(**weights: float) -> None:
    """Loss weights: each >= 0 (0 switches a term off)."""
    negative = {name: value for name, value in weights.items() if not value >= 0}
    if negative:
        listed = ", ".join(f"method.{name}={value}" for name, value in negative.items())
        raise ConfigError(f"loss weights must be >= 0, got {listed}")


def check_kd_options(kd_temperature: float, rampup_epochs: float = 0.0, **weights: float) -> None:
    """A distillation method's options: T > 0, the ramp length >= 0, every loss weight >= 0."""
    check_positive(kd_temperature=kd_temperature)
    if not rampup_epochs >= 0:
        raise ConfigError(f"method.rampup_epochs must be >= 0 (0 = no ramp), got {rampup_epochs}")
    check_loss_weights(**weights)


def check_projection_dim(projection_dim: int) -> None:
    if projection_dim < 1:
        raise ConfigError(f"method.projection_dim must be >= 1, got {projection_dim}")


def check_momentum(bank_momentum: float) -> None:
    """A memory bank's update momentum, in [0, 1)."""
    if not 0.0 <= bank_momentum < 1.0:
        raise ConfigError(f"method.bank_momentum must be in [0, 1), got {bank_momentum}")


def check_flags(**flags: object) -> None:
    """On/off options: true or false only (``bool("false")`` is True, so a string must not pass)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"method.{name} must be true or false, got {value!r}")
