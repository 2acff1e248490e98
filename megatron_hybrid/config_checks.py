"""`ConfigError` and the small checks that `ModelConfig` and the mixer specs
(megatron_hybrid/specs/) run on a config's fields."""

from __future__ import annotations


class ConfigError(ValueError):
    """A model configuration whose sizes do not fit together."""


def positive(config, *names: str) -> None:
    """Raise ConfigError naming the first of the fields `names` that is not a positive number."""
    for name in names:
        value = getattr(config, name)
        if value is None or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")


def choice(config, name: str, valid: tuple[str, ...]) -> None:
    if getattr(config, name) not in valid:
        raise ConfigError(f"{name}={getattr(config, name)!r} is not one of {', '.join(valid)}")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
