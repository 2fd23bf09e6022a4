"""Direct Preference Optimization (Rafailov et al., 2023): the sigmoid loss against a frozen reference model.

For a pair (prompt x, chosen y_w, rejected y_l), with log-probabilities summed over the completion's tokens only:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

averaged over the pairs of a step, and TRL's metrics beside it (`trl.DPOTrainer`, loss_type='sigmoid'):
`rewards/chosen` and `rewards/rejected` (beta * (log pi - log ref), no gradient), `rewards/accuracies` (the share
of pairs whose chosen reward is the larger), `rewards/margins` (chosen - rejected), `logps/chosen`,
`logps/rejected`. A policy equal to its reference gives ln 2.

**Batches** are those of SFT (`qwenjax.chat_data`): rows of `[batch, seq]` `inputs`, `targets`, `positions`,
`segment_ids` and `weights`, each sequence its own segment (no attention across segments). A pair's two
sequences (prompt + chosen, prompt + rejected) are the segments 2j+1 and 2j+2 of one row, and `weights` is 1 on the
targets that are completion tokens. So a sequence's log-probability is a sum over its segment, and pair j of a row
is (segment 2j+1, segment 2j+2).

**The reference** is the model the run started from, made once per run and never trained
(`train.initial_params`). Its log-probabilities come from a forward pass without gradient inside the same step,
on the same micro-batch (`reference_logprobs`): a DPO step costs the policy's forward and backward plus one
forward. With LoRA, the reference is the base model without adapters: the step's `reference` is then those base
parameters, not a second copy.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from qwenjax import loss as loss_lib
from qwenjax import model as model_lib
from qwenjax.model_config import ModelConfig

Batch = Mapping[str, jax.Array]

# The metrics of a step or an evaluation: sums over pairs, divided by the number of pairs.
PAIR_METRICS = ('loss', 'rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins', 'logps/chosen',
                'logps/rejected')


def segment_sums(values: jax.Array, batch: Batch) -> jax.Array:
  """`[rows, seq + 1]`: the sum of `values * weights` over each segment of each row (column s: segment s)."""
  segments = batch['segment_ids']
  weighted = values * batch['weights'].astype(jnp.float32)
  return jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=segments.shape[1] + 1))(weighted, segments)


def pairs(per_segment: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) `[rows, seq // 2]` of a `[rows, seq + 1]` per-segment array: segments 2j+1 and 2j+2."""
  n = (per_segment.shape[1] - 1) // 2
  return per_segment[:, 1::2][:, :n], per_segment[:, 2::2][:, :n]


def sequence_log_probs(model_config: ModelConfig, params: Any, batch: Batch, *, chunk: int = loss_lib.DEFAULT_CHUNK,
                       logits_dtype: str = 'float32', loss_impl: str = 'auto', lora: Any = None
                       ) -> tuple[jax.Array, dict]:
  """(`[rows, seq + 1]` summed completion log-probabilities of each segment, auxiliary losses) of one forward;
  `lora`: the adapters' collection (`qwenjax.lora.scaled`), None for the model alone."""
  hidden, aux = model_lib.apply_with_aux(model_config, params, batch['inputs'], batch.get('positions'),
                                         batch.get('segment_ids'), return_hidden=True, lora=lora)
  head = model_lib.output_head(model_config, params).astype(model_config.dtype)
  logp = loss_lib.token_log_probs(hidden, head, batch['targets'], chunk=chunk, logits_dtype=logits_dtype,
                                  impl=loss_impl)
  return segment_sums(logp, batch), aux


def reference_logprobs(model_config: ModelConfig, params: Any, batch: Batch, **loss_kwargs) -> jax.Array:
  """The reference model's `[rows, seq + 1]` summed completion log-probabilities, without gradient.

  `params` is the reference: the frozen copy of the run's initial parameters (`train.initial_params`). Under
  LoRA it is the base model's parameters, applied without the adapters (the policy is base + adapters), so no
  second copy of the model exists. Called once per micro-batch, inside the train step, before the policy's
  forward and backward (`qwenjax.train_step.make_train_step`).
  """
  return jax.lax.stop_gradient(sequence_log_probs(model_config, params, batch, **loss_kwargs)[0])


def sums(model_config: ModelConfig, params: Any, batch: Batch, reference: jax.Array, beta: float, lora: Any = None,
         **loss_kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(objective to differentiate, sums over the pairs of the (micro-)batch) against `reference`
  (`reference_logprobs` of the same batch).

  The objective is the summed pair losses (plus an MoE model's auxiliary loss, weighted by the pairs), so
  micro-batches add up and one division by the step's pairs gives the mean. The sums hold `PAIR_METRICS`,
  `pairs` and `target_tokens` (completion tokens of both sequences).
  """
  policy, aux = sequence_log_probs(model_config, params, batch, lora=lora, **loss_kwargs)
  chosen, rejected = pairs(policy)
  ref_chosen, ref_rejected = pairs(reference)
  counts = jax.vmap(lambda s: jax.ops.segment_sum(jnp.ones(s.shape, jnp.float32), s,
                                                  num_segments=s.shape[0] + 1))(batch['segment_ids'])
  valid = (pairs(counts)[0] > 0).astype(jnp.float32)  # a pair exists where its chosen segment does
  chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
  losses = -jax.nn.log_sigmoid(beta * (chosen_ratio - rejected_ratio)) * valid
  n = jnp.sum(valid)
  total = jnp.sum(losses) + aux['moe_aux_loss'] * n
  reward_chosen, reward_rejected = (jax.lax.stop_gradient(beta * chosen_ratio),
                                    jax.lax.stop_gradient(beta * rejected_ratio))
  sg = jax.lax.stop_gradient
  out = {
      'loss': sg(jnp.sum(losses)),
      'rewards/chosen': jnp.sum(reward_chosen * valid),
      'rewards/rejected': jnp.sum(reward_rejected * valid),
      'rewards/accuracies': jnp.sum((reward_chosen > reward_rejected) * valid),
      'rewards/margins': jnp.sum((reward_chosen - reward_rejected) * valid),
      'logps/chosen': sg(jnp.sum(chosen * valid)),
      'logps/rejected': sg(jnp.sum(rejected * valid)),
      'pairs': n,
      'target_tokens': jnp.sum(batch['weights'].astype(jnp.float32)),
  }
  out.update({k: sg(v) * n for k, v in aux.items()})
  return total, out


def metrics(summed: Mapping[str, jax.Array], num_experts: int = 0) -> dict[str, jax.Array]:
  """The logged values of summed `sums`: means over the pairs, and the counts."""
  n = jnp.maximum(summed['pairs'], 1.0)
  out = {k: summed[k] / n for k in PAIR_METRICS}
  out.update(pairs=summed['pairs'], target_tokens=summed['target_tokens'])
  if num_experts:
    out.update({k: v / n for k, v in summed.items() if k.startswith('moe_')})
  return out
