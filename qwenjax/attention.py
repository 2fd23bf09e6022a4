"""Causal attention with grouped-query heads, sliding windows and packed documents.

One entry point, `dot_product_attention`, picks an implementation:

* `'xla'`: the reference, plain einsums and an explicit mask. Runs everywhere.
* `'cudnn'`: `jax.nn.dot_product_attention(implementation='cudnn')`, fused on NVIDIA GPUs.

Masking follows Hugging Face: a query at position q sees keys k with
`q - sliding_window < k <= q` (no window: `k <= q`), and only keys of its own document
when `segment_ids` are given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla', 'cudnn')


def attention_mask(
    seq_len: int,
    *,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Boolean mask `[batch or 1, seq, seq]`: True where query (row) may see key (column)."""
  q = jnp.arange(seq_len)[:, None]
  k = jnp.arange(seq_len)[None, :]
  mask = k <= q
  if sliding_window is not None:
    mask &= k > q - sliding_window
  mask = mask[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def xla_attention(q, k, v, *, sliding_window=None, segment_ids=None):
  """Reference attention. Keys and values are never repeated per query head.

  q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
  Softmax runs in float32; the output has q's dtype.
  """
  batch, seq_len, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = q_heads // kv_heads
  q = q.reshape(batch, seq_len, kv_heads, groups, head_dim)
  scores = jnp.einsum('bqkgd,bskd->bkgqs', q, k, preferred_element_type=jnp.float32)
  scores *= head_dim**-0.5
  mask = attention_mask(seq_len, sliding_window=sliding_window, segment_ids=segment_ids)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgqs,bskd->bqkgd', probs, v)
  return out.reshape(batch, seq_len, q_heads, head_dim)


def cudnn_attention(q, k, v, *, sliding_window=None, segment_ids=None):
  """cuDNN flash attention (GPU only, bf16/fp16, head_dim a multiple of 8 up to 256)."""
  if segment_ids is not None:
    raise ValueError(
        "attention impl 'cudnn' cannot mask packed documents (segment_ids): jax has no public "
        "cuDNN path for them. Use attention_impl='xla' (or 'pallas' once available), or feed "
        'unpacked rows without segment_ids.')
  # A window without is_causal=True silently attends to the future (see docs): always causal.
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=window, implementation='cudnn')


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
    impl: str = 'xla',
) -> jax.Array:
  """Causal grouped-query attention.

  Args:
    q: `[batch, seq, q_heads, head_dim]`.
    k, v: `[batch, seq, kv_heads, head_dim]`; q_heads must be a multiple of kv_heads.
    sliding_window: if set, a query sees only the last `sliding_window` keys (itself included).
    segment_ids: `[batch, seq]` int document ids of packed rows; attention stays inside a document.
    impl: one of `IMPLEMENTATIONS`.

  Returns:
    `[batch, seq, q_heads, head_dim]` in q's dtype.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f'expected q [b, s, h, d] and k, v [b, s, kv_h, d]; got {q.shape}, {k.shape}, {v.shape}')
  if q.shape[2] % k.shape[2]:
    raise ValueError(f'q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})')
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f'sliding_window must be a positive int or None, got {sliding_window}')
  if impl == 'xla':
    return xla_attention(q, k, v, sliding_window=sliding_window, segment_ids=segment_ids)
  if impl == 'cudnn':
    return cudnn_attention(q, k, v, sliding_window=sliding_window, segment_ids=segment_ids)
  raise ValueError(f'unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}')
