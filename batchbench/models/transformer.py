"""Decoder-only Transformer language model, pre-LayerNorm (GPT-2 style), in flax.linen.

Learned positional embeddings, causal multi-head self-attention, GELU MLP, a final LayerNorm,
and an output projection tied to the token embedding (logits = h @ E^T, no separate output
matrix). Parameters are always float32; ``dtype`` is the compute dtype (bfloat16 allowed);
logits come back in float32.

Dropout (embeddings, attention weights, and each residual branch) is active only when
``train`` and draws from the ``"dropout"`` RNG stream:
``model.apply(variables, tokens, train=True, rngs={"dropout": key})``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# GPT-2's initialisation scale for the embeddings; flax's default Embed init (std 1) would
# make the tied output logits grow like sqrt(d_model).
EMBED_INIT = nn.initializers.normal(stddev=0.02)


class Block(nn.Module):
  """x + attn(LN(x)), then x + MLP(LN(x)).

  Attributes:
    num_heads: attention heads; d_model must be a multiple of it.
    d_ff: hidden width of the MLP.
    dropout_rate: dropout on attention weights and on each residual branch.
    dtype: compute dtype.
  """

  num_heads: int
  d_ff: int
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Applies the block.

    Args:
      x: activations (batch, seq_len, d_model).
      train: enable dropout.

    Returns:
      Activations of the same shape.
    """
    d_model = x.shape[-1]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.bool_))
    h = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_attn")(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        dropout_rate=self.dropout_rate, deterministic=not train, name="attn")(h, mask=mask)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_mlp")(x)
    h = nn.Dense(self.d_ff, dtype=self.dtype, param_dtype=jnp.float32, name="mlp_in")(h)
    h = nn.gelu(h)
    h = nn.Dense(d_model, dtype=self.dtype, param_dtype=jnp.float32, name="mlp_out")(h)
    return x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)


class TransformerLM(nn.Module):
  """Decoder-only Transformer LM over byte tokens (vocab 256 by default).

  ``remat=True`` wraps every ``Block`` in ``nn.remat`` (``jax.checkpoint``) with the default
  policy, which saves nothing inside a block: only each block's input is kept and the block is
  recomputed on the backward pass. Outputs and gradients are unchanged.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual stream width.
    num_layers: number of blocks.
    num_heads: attention heads per block.
    d_ff: MLP hidden width.
    max_len: longest sequence (size of the positional embedding table).
    dropout_rate: dropout probability when training.
    dtype: compute dtype; parameters stay float32.
    remat: recompute each block on the backward pass.
  """

  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  d_ff: int = 1024
  max_len: int = 256
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Computes next-token logits.

    Args:
      tokens: int32 token ids (batch, seq_len) with seq_len <= max_len.
      train: enable dropout (needs ``rngs={"dropout": key}``).

    Returns:
      float32 logits (batch, seq_len, vocab_size); position t sees tokens 0..t only.
    """
    seq_len = tokens.shape[1]
    if seq_len > self.max_len:
      raise ValueError(f"sequence length {seq_len} exceeds TransformerLM max_len={self.max_len}.")
    if self.d_model % self.num_heads:
      raise ValueError(f"TransformerLM d_model={self.d_model} must be a multiple of "
                       f"num_heads={self.num_heads}.")
    embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=EMBED_INIT,
                     dtype=self.dtype, param_dtype=jnp.float32, name="embed")
    pos = self.param("pos_embed", EMBED_INIT, (self.max_len, self.d_model), jnp.float32)
    x = embed(tokens) + jnp.asarray(pos[:seq_len], self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # `train` (argument 2, counting self) is a Python bool that selects code, so static.
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    for i in range(self.num_layers):
      # Explicit names keep the variable tree identical with and without remat.
      x = block_cls(self.num_heads, self.d_ff, self.dropout_rate, self.dtype,
                    name=f"block{i + 1}")(x, train)
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_final")(x)
    return jnp.asarray(embed.attend(x), jnp.float32)  # tied output projection


def matmul_params(model: TransformerLM) -> int:
  """N of ``transformer_flops_per_token``: the weights that multiply activations, per token.

  Counts per block the Q, K, V and output projections (4 d_model^2) and the two MLP matrices
  (2 d_model d_ff), plus the tied output projection (vocab_size d_model), which is a real
  matmul even though it shares its weights with the input embedding. Leaves out the input
  embedding lookup (a gather) and the positional embedding, LayerNorm parameters and biases
  (elementwise, not matmuls).

  Args:
    model: a ``TransformerLM``.

  Returns:
    The number of matmul weights.
  """
  d = model.d_model
  per_block = 4 * d * d + 2 * d * model.d_ff
  return model.num_layers * per_block + model.vocab_size * d


def transformer_flops_per_token(model: TransformerLM, seq_len: int) -> float:
  """Analytic training FLOPs per token: 6 N + 12 L d T (PaLM, Chowdhery et al. 2022, App. B).

  N is ``matmul_params(model)``; each weight costs 2 FLOPs per token forward and 4 backward.
  The attention term counts, per layer, the Q K^T scores and the weighted sum of V, each
  2 d T FLOPs per token forward, times 3 for training: 12 L d T with H Q = d_model and
  T = seq_len. As in PaLM (and MaxText's default) the causal mask is not credited: the full
  T x T score matrix is counted. Softmax, LayerNorm, GELU and dropout are ignored.

  Args:
    model: a ``TransformerLM``.
    seq_len: tokens per sequence, T.

  Returns:
    Training FLOPs per token.
  """
  return float(6 * matmul_params(model)
               + 12 * model.num_layers * model.d_model * seq_len)
