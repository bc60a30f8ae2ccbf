"""Model adapters: ids, shift, token-aligned logits, and one layer's AGDO statistics from the same forward.

Public API::

    adapter = load_adapter(model_or_local_dir, family="auto" | "generic" | "dream" | "llada", tokenizer=None)
    out = adapter.forward(input_ids, attention_mask, unmasked=U, response_start=P, influence_query_mask=M,
                          attention_layer="last", attention_heads="all")
    out.logits, out.s, out.s0, out.abar_rr, out.influence       # per token; None where not asked

Conventions
-----------
- ``logits[:, i]`` predicts token ``i`` for every family. Shifted models (Dream: row ``i-1`` predicts
  token ``i``) are rolled by one; token 0 has no predictor row and gets row 0's logits, as Dream's own
  ``generate`` does (never use them: position 0 is always prompt).
- ``s[:, i]`` is the valid attention of token ``i``'s predictor row on the key set ``unmasked``; 0 for a
  token without a predictor row or at padding. ``influence`` is per key; its valid query rows are the
  predictor rows of the tokens in ``influence_query_mask``. ``s0, abar_rr`` come from
  ``agdo_kernels.response_attention(shift=adapter.shift)``.
- Padding: ``attention_mask`` False masks the KEY everywhere (bidirectional); positions count real
  tokens only (left padding does not move RoPE), as ``generate`` does for generic and Dream models.
  LLaDA takes the 2D mask itself and uses absolute positions (its code has no position ids).
- How a padded batch attends (``load_adapter(..., padded_attention=...)``, or the adapter attribute):
  ``"mask"`` (default) keeps the model's own 4D-masked attention in every layer; ``"varlen"`` packs each
  layer's real tokens for a varlen flash kernel (flash-attn: ``pip install agdo[flash]``; else torch's own
  ``varlen_attn`` on CUDA); ``"nested"`` runs SDPA on jagged nested tensors; ``"auto"`` = ``"varlen"`` on
  CUDA in fp16/bf16 with flash-attn installed, else ``"mask"``. Every route gives the same logits of real
  rows, statistics and gradients (to rounding); a batch without padding always takes the model's own path.
  Neither torch route was faster than the mask where measured (CPU; H200 at N = 1024): see
  ``_padded_attention``. Bad values raise ``ValueError`` naming the argument.
- Which attention (SPEC §4, ablations of the arXiv paper, Tables 5-6): ``attention_layer`` = ``"last"``
  (default; the paper's choice), ``"first"``, ``"middle"`` (index ``num_layers // 2``, 0-based) or an int
  index (negative counts from the end, Python style); ``attention_heads`` = ``"all"`` (default: ``Abar``
  averages every query head), a list of query-head indices (``Abar`` = the mean over those heads; with GQA
  head ``h`` reads kv head ``h // g``), or ``"local"`` / ``"global"``: per sequence, each head's mean
  attention distance ``D_h = mean over real query rows i of sum_k P[h,i,k]·|i-k|`` is computed on the same
  forward (chunked over query rows, float32); heads sorted by ``(D_h, h)`` (ties: lower index first),
  ``"local"`` = the first ``H // 2``, ``"global"`` = the other ``H - H // 2`` (odd ``H``: the extra head is
  global). Bad values raise ``ValueError`` naming the argument.
- Ids (mask / pad / EOS) and ``H, Hkv, d`` come from the config (then generation config, then
  tokenizer); ``_families.FAMILY_DEFAULTS`` holds what public checkpoints contain, used only where all
  of those lack the field. ``shift`` is ``config.diffusion_shift`` when set, else the family's.

How each family is hooked (one forward, the chosen layer only, no layer switched to eager)
-----------------------------------------------------------------------------------------
The chosen layer's attention call — post-RoPE ``q (B, H, N, d)``, ``k, v (B, Hkv, N, d)`` — goes through
``_capture.LayerCapture``, which calls the public ``agdo_kernels`` functions on (the chosen heads of)
``q``/``k``, without gradient and never materialising ``H×N×N``. The layer's OUTPUT is always the
model's own attention call, made exactly as without the hook, so the logits are bitwise the same whether
statistics are asked or not (Max-S and Max-Prob decoding see identical logits), and gradient and dropout
are untouched. (Earlier versions let the fused ``valid_attention(return_output=True)`` replace SDPA when
only ``S`` was asked; its output differs from SDPA's in the last bits. Routing every forward through the
fused kernel instead would slow the normal forward, which runs FlashAttention/cuDNN SDPA on a GPU, and lose
the backward; the S-only pass costs ~half an attention forward of one layer, only when ``S`` is asked.)
Every hook is a context manager that restores the model on exit, even on error; the capture checks it ran
exactly once, on ``H`` heads, under a bidirectional key-padding mask, and says why when not.

- generic (transformers ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ... with ``config.is_causal=False``,
  transformers >= 4.56): an ``"agdo_sdpa"`` / ``"agdo_eager"`` function is registered in transformers'
  ``AttentionInterface``; during the forward the model's config points to it. It delegates every layer
  to the original function; the chosen layer's module (``model.get_decoder().layers[i].self_attn``)
  carries the capture, which computes the statistics beside that same call. The adapter passes a 4D additive key-padding mask, so
  the model is bidirectional whatever the transformers version; ``config.is_causal=False`` is copied
  onto the attention modules' ``is_causal`` flags for versions that only read those.
- Dream (``trust_remote_code``; ``DreamModel.model.layers[i].self_attn`` is a ``DreamSdpaAttention`` that
  applies RoPE itself, repeats k/v to ``H`` heads, and calls ``torch.nn.functional.
  scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=False)`` directly; ``output_attentions``
  falls back to its eager class): the chosen layer's ``self_attn.forward`` is wrapped so that, only while it runs,
  ``torch.nn.functional.scaled_dot_product_attention`` is the capture. The kernels then see ``Hkv = H``
  (the repeated heads; identical statistics). Not thread-safe, not for ``torch.compile``.
- LLaDA (``trust_remote_code``; ``LLaDAModelLM.model.transformer.blocks[i]`` — or ``block_groups`` — are
  ``LLaDALlamaBlock`` s whose ``attention()`` projects, applies RoPE, then calls the block method
  ``_scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)``, which repeats GQA heads and
  calls SDPA or flash-attn; no ``output_attentions``): that method is replaced on the chosen block's
  instance for the duration of the forward.

Verified against small local fixtures reproducing those layouts (``tests/fixtures``), not against the
real checkpoints' code.
"""

from ._capture import check_attention_heads, check_attention_layer
from .adapter import AdapterOutput, DiffusionLMAdapter, load_adapter

__all__ = ["load_adapter", "DiffusionLMAdapter", "AdapterOutput", "check_attention_layer", "check_attention_heads"]
