"""The torch backend: the CPU path and the float64 test oracle (inputs arrive validated)."""

from .attention import influence_sum, response_block, valid_attention
from .ordering import dense_steps, greedy_order

__all__ = ["valid_attention", "influence_sum", "response_block", "greedy_order", "dense_steps"]
