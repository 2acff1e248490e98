"""The registry of mixer specs, one per implemented pattern symbol (megatron_hybrid/specs/base.py
says what a spec holds). A symbol of the pattern language without a spec here parses but fails
when a model is built."""

from __future__ import annotations

from types import MappingProxyType

from megatron_hybrid.specs import attention, dsa, gated_delta_net, mamba2, mla, mlp, moe
from megatron_hybrid.specs.base import MixerSpec

SPECS: MappingProxyType[str, MixerSpec] = MappingProxyType(
    {
        spec.symbol: spec
        for spec in (
            mamba2.SPEC,
            attention.SPEC,
            mlp.SPEC,
            moe.SPEC,
            gated_delta_net.SPEC,
            mla.SPEC,
            dsa.SPEC,
        )
    }
)

IMPLEMENTED_SYMBOLS = frozenset(SPECS)


def implemented_listing() -> str:
    """ "M (Mamba2), * (attention), ...": the implemented symbols, for messages."""
    return ", ".join(f"{symbol} ({spec.name})" for symbol, spec in SPECS.items())


__all__ = ["IMPLEMENTED_SYMBOLS", "SPECS", "MixerSpec", "implemented_listing"]
