"""agdo: post-training diffusion language models with attention-guided denoising orders.

The training layer on top of :mod:`agdo_kernels`: model adapters (``agdo.models``), denoising orders,
samplers (``agdo.sampling``), SFT/RL trainers, rewards (``agdo.rewards``), evaluation and the CLI.
"""

__version__ = "0.1.0"
