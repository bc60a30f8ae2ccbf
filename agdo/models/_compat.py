"""Load-time compatibility of the published Dream / LLaDA remote code with transformers 4.56 … 5.x.

The code users load is the modeling code shipped in the checkpoint (Dream-org/Dream-v0-*-7B,
GSAI-ML/LLaDA-8B-*). It was written for transformers 4.x; on 5.x parts of it fail, one of them silently.
Each problem is detected, then repaired and the repair verified, or refused with the reason and the fix:

Classes, before anything is built (``load_remote_model``, and ``repair_model`` for a model built elsewhere):

- Dream's rotary embedding looks up ``ROPE_INIT_FUNCTIONS["default"]``, which transformers 5 removed:
  the modeling module gets a table with the 4.x default put back.
- ``DreamGenerationConfig.validate(self, is_init=False)`` takes none of the keywords transformers passes
  (``strict=`` on every save, ``user_set_attributes=`` on every 5.x load): unknown keywords are dropped.
- ``_tied_weights_keys`` as a list (Dream): transformers 5 reads a ``{tied: source}`` dict (``save_pretrained``
  fails): each listed parameter is mapped to the input embedding, its source in transformers 4.
- LLaDA's ``LLaDAModelLM.__init__`` never calls ``post_init``, so transformers 5 finds no
  ``all_tied_weights_keys``: ``post_init`` runs after the file's ``__init__`` (without re-initialising weights).
- LLaDA's ``tie_weights(self)`` takes none of transformers 5's ``missing_keys=`` / ``recompute_mapping=``:
  they are dropped (the file ties what its config says, as before).
- LLaDA's configuration file registers it with ``AutoConfig`` / ``AutoModel`` on import, and transformers 5
  prefers registered classes to a directory's own code: a second LLaDA checkpoint in one process silently
  runs the first one's classes. The classes are therefore loaded by path from the directory, and the
  classes that run are checked to be that directory's code.

Instances, after loading (``repair_model``):

- Dream's rotary ``inv_freq`` are non-persistent buffers; transformers 5 allocates them empty on load and
  leaves them so (the remote ``_init_weights`` does not know them): RoPE is garbage and nothing fails.
  Every one is recomputed from the config and verified.
- transformers 5 drops ``use_cache`` from LLaDA's config (a generation parameter there) while its forward
  reads it: set to ``False``, the file's default (LLaDA refuses a KV cache anyway).

LLaDA's modeling file from before October 2025 calls SDPA with ``attn_mask=None`` in every block: a padded
batch attends to its pad tokens while the statistics assume it does not. ``probe_padding_mask`` finds such
blocks by behaviour at load time (and warns), and ``require_padding_mask`` (called by the family's
``model_inputs``) refuses a padded batch for them, naming the update; unpadded batches run as before.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import warnings
import weakref

import torch
from torch import nn

# Where transformers imports the code of a checkpoint directory (its dynamic-module package).
DYNAMIC_MODULES = "transformers_modules."

PRE_OCTOBER_LLADA = (
    "its modeling_llada.py is from before October 2025 and calls SDPA with attn_mask=None in every block, so "
    "a padded batch attends to its pad tokens while the AGDO statistics assume it does not. Update "
    "modeling_llada.py and configuration_llada.py in the checkpoint directory to the October 2025 (or later) "
    "version published with GSAI-ML/LLaDA-8B-Instruct, or pass batches without padding"
)

_repaired_classes = weakref.WeakSet()
_models_ignoring_padding = weakref.WeakSet()  # model classes whose blocks ignore the attention mask


# ---------------------------------------------------------------------------------------------- loading


def load_remote_model(path: str, kwargs: dict) -> nn.Module:
    """The model of a Dream / LLaDA directory, built by ITS code: classes loaded by path (never through the
    Auto registry), repaired, then ``from_pretrained`` with ``kwargs``."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    if not kwargs.pop("trust_remote_code", True):
        raise ValueError(
            f"{path!r} ships its own modeling code, which load_adapter runs: pass trust_remote_code=True "
            "(the default) or load a checkpoint whose architecture transformers implements"
        )
    auto_map = _auto_map(path)
    auto_class = next((name for name in ("AutoModel", "AutoModelForCausalLM") if name in auto_map), None)
    if auto_class is None:
        raise ValueError(
            f"config.json of {path!r} has no auto_map.AutoModel: load_adapter needs the published modeling "
            "code in the directory (as in the Dream / LLaDA checkpoints)"
        )
    model_class = get_class_from_dynamic_module(
        auto_map[auto_class], path, local_files_only=kwargs.get("local_files_only", True)
    )
    repair_classes(model_class)
    # As the Auto classes do: save_pretrained then writes the code beside the weights.
    model_class.register_for_auto_class(auto_class)
    model_class.config_class.register_for_auto_class()
    return model_class.from_pretrained(path, **kwargs)


def _auto_map(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get("auto_map") or {}


def verify_code_origin(model: nn.Module, directory) -> None:
    """The model's and its config's classes must be the code of ``directory`` when they come from a
    checkpoint directory (transformers' dynamic modules): raise otherwise."""
    if not directory or not os.path.isdir(directory):
        return
    for cls in (type(model), type(model.config)):
        if not cls.__module__.startswith(DYNAMIC_MODULES):
            continue
        loaded = sys.modules[cls.__module__].__file__
        own = os.path.join(directory, os.path.basename(loaded))
        if os.path.isfile(own) and _read(loaded) != _read(own):
            raise RuntimeError(
                f"{type(model).__name__} loaded for {directory!r} runs {cls.__name__} from {loaded}, not the "
                f"directory's own {os.path.basename(own)}: another checkpoint's code, registered with "
                "transformers' Auto classes when it was imported, took its place. Load the directory with "
                "agdo.models.load_adapter(path), which builds it with its own code"
            )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------- classes


def repair_classes(model_class: type) -> None:
    """Make the checkpoint code of ``model_class`` (and of the modules it comes from) work on this
    transformers version; idempotent."""
    from transformers import GenerationConfig, PreTrainedModel

    transformers_5 = hasattr(PreTrainedModel, "get_expanded_tied_weights_keys")
    custom = [cls for cls in model_class.__mro__ if _is_custom_code(cls)]
    modules = {sys.modules[cls.__module__] for cls in custom}
    for module in modules:
        _restore_default_rope(module)
        for value in list(vars(module).values()):
            if isinstance(value, type) and issubclass(value, GenerationConfig) and _is_custom_code(value):
                _drop_unknown_keywords(value, "validate")
    for cls in custom:
        if cls in _repaired_classes or not issubclass(cls, PreTrainedModel):
            continue
        _drop_unknown_keywords(cls, "tie_weights")
        if transformers_5:
            tied = vars(cls).get("_tied_weights_keys")
            if isinstance(tied, (list, tuple)):
                cls._tied_weights_keys = _TiedToInputEmbeddings(tied)
        _repaired_classes.add(cls)
    if transformers_5:
        _run_missing_post_init(model_class)


def _is_custom_code(cls: type) -> bool:
    """Code that ships with a checkpoint (or a copy of it), not transformers' own."""
    return not cls.__module__.startswith(("transformers.", "torch.", "builtins"))


def _restore_default_rope(module) -> None:
    """transformers 5 has no ``ROPE_INIT_FUNCTIONS["default"]`` (each model computes its own default)."""
    table = vars(module).get("ROPE_INIT_FUNCTIONS")
    if isinstance(table, dict) and "default" not in table:
        module.ROPE_INIT_FUNCTIONS = {**table, "default": default_rope_parameters}


def default_rope_parameters(config, device=None, seq_len=None, **rope_kwargs):
    """transformers 4's ``ROPE_INIT_FUNCTIONS["default"]``: ``(inv_freq, attention_scaling=1.0)``."""
    return expected_inv_freq(config, "default", device), 1.0


def _drop_unknown_keywords(cls: type, method: str) -> None:
    """Let ``cls.method`` (defined by ``cls`` itself) be called with keywords it does not take: they are
    dropped (newer transformers pass more of them than the published code accepts)."""
    function = vars(cls).get(method)
    if not inspect.isfunction(function):
        return
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = {p.name for p in parameters}

    @functools.wraps(function)
    def accepting_newer_keywords(self, *args, **kwargs):
        return function(self, *args, **{name: value for name, value in kwargs.items() if name in accepted})

    setattr(cls, method, accepting_newer_keywords)


class _TiedToInputEmbeddings:
    """``_tied_weights_keys`` for transformers 5, which reads ``{tied parameter: source parameter}``, from the
    published list form, which names the tied parameters only (transformers 4 tied them to the input
    embedding): the source is found per model."""

    def __init__(self, tied):
        self.tied = tuple(tied)

    def __get__(self, model, owner=None):
        if model is None:
            return self
        source = model.get_input_embeddings().weight
        name = next(name for name, p in model.named_parameters(remove_duplicate=False) if p is source)
        return dict.fromkeys(self.tied, name)


def _run_missing_post_init(model_class: type) -> None:
    """transformers 5 needs what ``post_init`` sets up (``all_tied_weights_keys``, ...); LLaDA's
    ``LLaDAModelLM.__init__`` never calls it. Run it after such an ``__init__``, leaving the weights as the
    file made them."""
    init = vars(model_class).get("__init__")
    if init is None or getattr(init, "_agdo_completes_post_init", False):
        return

    @functools.wraps(init)
    def init_then_post_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not hasattr(self, "all_tied_weights_keys"):
            self.init_weights = lambda: None  # post_init ends by (re-)initialising every weight: not here
            try:
                self.post_init()
            finally:
                del self.init_weights

    init_then_post_init._agdo_completes_post_init = True
    model_class.__init__ = init_then_post_init


# -------------------------------------------------------------------------------------------- instances


def repair_model(model: nn.Module, family: str, directory=None) -> None:
    """Repair and verify a model of ``family`` (loaded from ``directory``, or built by the caller)."""
    from transformers import GenerationConfig

    if _is_custom_code(type(model)):
        repair_classes(type(model))
        generation_config = getattr(model, "generation_config", None)
        if isinstance(generation_config, GenerationConfig) and _is_custom_code(type(generation_config)):
            _drop_unknown_keywords(type(generation_config), "validate")
        verify_code_origin(model, directory or getattr(model.config, "_name_or_path", None))
    if family in ("dream", "llada") and not hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if family == "dream" and _is_custom_code(type(model)):
        _repair_rotary_buffers(model)


def _repair_rotary_buffers(model: nn.Module) -> None:
    """Recompute every ``inv_freq`` buffer that differs from the config's RoPE, then verify all of them."""
    rotary = [
        (name, module, _module_inv_freq(module, model.config))
        for name, module in model.named_modules()
        if isinstance(module._buffers.get("inv_freq"), torch.Tensor) and module.inv_freq.device.type != "meta"
    ]
    repaired = []
    for name, module, expected in rotary:
        if not _same_inv_freq(module.inv_freq, expected):
            with torch.no_grad():
                module.inv_freq.copy_(expected.to(module.inv_freq.dtype))
            if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
                module.original_inv_freq = module.inv_freq  # what dynamic RoPE resets to
            repaired.append(name)
    wrong = [name for name, module, expected in rotary if not _same_inv_freq(module.inv_freq, expected)]
    if wrong:
        raise RuntimeError(f"rotary inv_freq of {wrong} still differ from the config's RoPE after recomputing them")
    if repaired:
        warnings.warn(
            f"{type(model).__name__}: {len(repaired)} rotary inv_freq buffers were not initialised by "
            "from_pretrained (transformers 5 leaves the non-persistent buffers of remote code empty); "
            "recomputed from the config and verified",
            stacklevel=4,  # the caller of load_adapter
        )


def _module_inv_freq(module: nn.Module, model_config) -> torch.Tensor:
    config = getattr(module, "config", None) or model_config
    rope_type = getattr(module, "rope_type", None) or _rope_type(config)
    return expected_inv_freq(config, rope_type, module.inv_freq.device)


def _same_inv_freq(buffer: torch.Tensor, expected: torch.Tensor) -> bool:
    target = expected.to(buffer.dtype).float()
    return bool(torch.allclose(buffer.float(), target, rtol=torch.finfo(buffer.dtype).eps, atol=0.0))


def _rope_type(config) -> str:
    scaling = getattr(config, "rope_scaling", None)
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def expected_inv_freq(config, rope_type: str, device=None) -> torch.Tensor:
    """RoPE inverse frequencies of ``config`` as transformers 4 computes them (``"default"``, ``"linear"``)."""
    if rope_type not in ("default", "linear"):
        raise ValueError(
            f"RoPE type {rope_type!r} (config.rope_scaling): agdo recomputes and verifies the rotary buffers "
            "of remote code for 'default' and 'linear' RoPE only, and cannot vouch for this model's positions"
        )
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = getattr(config, "rope_theta", None) or scaling.get("rope_theta")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    return inv_freq


# --------------------------------------------------------------------------------------- padding mask


def probe_padding_mask(model: nn.Module, blocks, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Call every LLaDA block's ``_scaled_dot_product_attention`` on three equal keys with the third masked
    and compare with the same call on the first two keys only: a block that ignores ``attn_mask`` gives the
    masked key (value 100) a third of the weight, and the outputs differ by about 33."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, num_heads, 2, head_dim, generator=generator)
    k = torch.randn(1, num_kv_heads, 1, head_dim, generator=generator).expand(-1, -1, 3, -1).contiguous()
    v = torch.randn(1, num_kv_heads, 3, head_dim, generator=generator)
    v[:, :, 2] = 100.0
    ignoring = []
    with torch.no_grad():
        for index, block in enumerate(blocks):
            weight = next(block.parameters())
            if weight.device.type == "meta":
                return
            bq, bk, bv = (t.to(device=weight.device, dtype=weight.dtype) for t in (q, k, v))
            bias = torch.zeros(1, 1, 2, 3, device=weight.device, dtype=weight.dtype)
            bias[..., 2] = torch.finfo(weight.dtype).min
            masked = block._scaled_dot_product_attention(bq, bk, bv, attn_mask=bias, dropout_p=0.0, is_causal=False)
            unpadded = block._scaled_dot_product_attention(
                bq, bk[:, :, :2], bv[:, :, :2], attn_mask=None, dropout_p=0.0, is_causal=False
            )
            if (masked.float() - unpadded.float()).abs().max() > 1.0:
                ignoring.append(index)
    if ignoring:
        _models_ignoring_padding.add(type(model))
        warnings.warn(
            f"{type(model).__name__} attends to padded keys in blocks {ignoring}: {PRE_OCTOBER_LLADA}. Padded "
            "batches are refused",
            stacklevel=3,  # the caller of load_adapter
        )


def ignores_padding_mask(model: nn.Module) -> bool:
    """True when ``probe_padding_mask`` found blocks of this model's code that attend to padded keys."""
    return type(model) in _models_ignoring_padding


def require_padding_mask(model: nn.Module) -> None:
    """Refuse a padded batch for a model whose code ignores the padding mask."""
    if ignores_padding_mask(model):
        raise ValueError(f"{type(model).__name__} refuses a padded batch: {PRE_OCTOBER_LLADA}")
