"""The unreduced baseline: the reference row of every table."""
from __future__ import annotations

from methods.base import TokenReducer, register_reducer


@register_reducer("none")
class NoReduction(TokenReducer):
    """Runs the model unchanged (through the shared block, so token counts are still recorded)."""
