"""The Triton backend: one file per op (kernels + launcher). Inputs arrive validated.

This package is imported only when a Triton backend is resolved (``agdo_kernels._backends.module``),
so ``import agdo_kernels`` stays light on machines without Triton.
"""

from .greedy_order import greedy_order
from .influence import influence_sum
from .response_attention import response_block
from .valid_attention import valid_attention

# valid_attention and influence_sum apply the non-finite row rule themselves, on the device (nonfinite.py).
POISONS_NONFINITE_ROWS = True

__all__ = ["valid_attention", "influence_sum", "response_block", "greedy_order"]
