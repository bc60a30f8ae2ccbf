"""The Triton backend: one file per op (kernels + launcher). Inputs arrive validated.

Submodules are imported on first use so that ``import agdo_kernels`` stays light and an op's kernels
are compiled only when that op runs.
"""

import importlib

_OP_MODULES = {
    "valid_attention": "valid_attention",
    "influence_sum": "influence",
    "response_block": "response_attention",
    "greedy_order": "greedy_order",
}


def __getattr__(name):
    if name not in _OP_MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_OP_MODULES[name]}"), name)
