"""Model adapters: ids, shift, token-aligned logits, and last-layer AGDO statistics from the same forward.

Public API::

    adapter = load_adapter(model_or_local_dir, family="auto" | "generic" | "dream" | "llada", tokenizer=None)
    out = adapter.forward(input_ids, attention_mask, unmasked=U, response_start=P, influence_query_mask=M)
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
- Ids (mask / pad / EOS) and ``H, Hkv, d`` come from the config (then generation config, then
  tokenizer); ``_families.FAMILY_DEFAULTS`` holds what public checkpoints contain, used only where all
  of those lack the field. ``shift`` is ``config.diffusion_shift`` when set, else the family's.

How each family is hooked (one forward, the last layer only, no layer switched to eager)
---------------------------------------------------------------------------------------
The last layer's attention call — post-RoPE ``q (B, H, N, d)``, ``k, v (B, Hkv, N, d)`` — goes through
``_capture.LastLayerCapture``, which calls the public ``agdo_kernels`` functions. When only ``S`` is asked
and no gradient is needed, ``valid_attention(return_output=True)`` produces that layer's output and ``S``
in one pass and replaces the model's SDPA; otherwise the model's own attention produces the output (so
it keeps gradient and dropout) and the statistics are computed beside it, without gradient. Every
hook is a context manager that restores the model on exit, even on error; the capture checks it ran
exactly once, on ``H`` heads, under a bidirectional key-padding mask, and says why when not.

- generic (transformers ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ... with ``config.is_causal=False``,
  transformers >= 4.56): an ``"agdo_sdpa"`` / ``"agdo_eager"`` function is registered in transformers'
  ``AttentionInterface``; during the forward the last attention module's config points to it. It
  delegates every layer to the original function except the last (found as
  ``model.get_decoder().layers[-1].self_attn``). The adapter passes a 4D additive key-padding mask, so
  the model is bidirectional whatever the transformers version; ``config.is_causal=False`` is copied
  onto the attention modules' ``is_causal`` flags for versions that only read those.
- Dream (``trust_remote_code``; ``DreamModel.model.layers[i].self_attn`` is a ``DreamSdpaAttention`` that
  applies RoPE itself, repeats k/v to ``H`` heads, and calls ``torch.nn.functional.
  scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=False)`` directly; ``output_attentions``
  falls back to its eager class): the last ``self_attn.forward`` is wrapped so that, only while it runs,
  ``torch.nn.functional.scaled_dot_product_attention`` is the capture. The kernels then see ``Hkv = H``
  (the repeated heads; identical statistics). Not thread-safe, not for ``torch.compile``.
- LLaDA (``trust_remote_code``; ``LLaDAModelLM.model.transformer.blocks[i]`` — or ``block_groups`` — are
  ``LLaDALlamaBlock`` s whose ``attention()`` projects, applies RoPE, then calls the block method
  ``_scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)``, which repeats GQA heads and
  calls SDPA or flash-attn; no ``output_attentions``): that method is replaced on the last block's
  instance for the duration of the forward.

Verified against small local fixtures reproducing those layouts (``tests/fixtures``), not against the
real checkpoints' code.
"""

from .adapter import AdapterOutput, DiffusionLMAdapter, load_adapter

__all__ = ["load_adapter", "DiffusionLMAdapter", "AdapterOutput"]
