"""Does the LM lean on the CLS's view of later response tokens? The run's eval-split LM loss under
its training mask and with that path closed (`python -m clsalign_jax.after_training lm-leak`).

Under `mask.cls_response` other than "none" the CLS reads response tokens and response rows read the
CLS, so a row can see later tokens of its own target through the CLS state (docs/method.md §2.1,
caveat of the response-reading modes); a model that learned to use that path does worse once it is
closed.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from clsalign_jax import artifacts
from clsalign_jax import model as model_lib
from clsalign_jax.train.inputs import InitFrom, make_data_iterator, resolve_text_inputs
from clsalign_jax.train.step import make_eval_step

# Masks that close the CLS's path from a response row to later response tokens, next to the run's
# own training mask.
LEAK_MASKS = (
  ("training mask", {}),
  ("CLS reads the query only", {"cls_response": "none"}),
  ("response rows do not read the CLS", {"response_sees_cls": False}),
)


def _lm_loss(config, cfg: model_lib.ModelConfig, params, num_batches: int, inputs) -> dict:
  """LM loss of `params` on the eval split of `config`'s data, as the training loop's eval sums it."""
  step = jax.jit(make_eval_step(config, cfg))
  it = make_data_iterator(config, config.data.eval_split, 0, 1, inputs)
  lm_sum = lm_count = 0.0
  batches = 0
  for batch in it if num_batches < 0 else itertools.islice(it, num_batches):
    sums = step(params, jax.tree.map(jnp.asarray, batch))
    lm_sum, lm_count, batches = lm_sum + float(sums["lm_sum"]), lm_count + float(sums["lm_count"]), batches + 1
  return {"lm_loss": lm_sum / max(lm_count, 1.0), "tokens": int(lm_count), "batches": batches}


def lm_leak(config, workdir: str, num_batches: int = -1) -> dict:
  """The LM loss of the run in `workdir` (trained with `config`, its saved config) on its eval split
  under its training mask and under the masks of LEAK_MASKS: {mask name: {lm_loss, tokens, batches}}.
  `num_batches` -1 reads the whole split (synthetic data never ends: there it means the run's own
  `eval.num_batches`)."""
  if num_batches < 0 and config.data.source == "synthetic":
    num_batches = int(config.eval.num_batches)
  loaded = artifacts.load(f"orbax:{workdir}", need_tokenizer=False)
  cfg = loaded.cfg.replace(attention_impl="xla")
  # Onto the default device explicitly: the run's step is restored onto the host CPU, and jnp.asarray
  # or a bare device_put would leave those committed arrays there (the loss would run on the CPU).
  params = jax.device_put(model_lib.to_layout(loaded.params, cfg), jax.devices()[0])
  # The run's tokenizer and template, resolved once for the three masks' batches.
  inputs = resolve_text_inputs(config, model_lib.config_from_fields(config.model), InitFrom(config.init_from))
  out = {}
  for name, overrides in LEAK_MASKS:
    c = config.copy_and_resolve_references()
    c.mask.update(overrides)
    out[name] = _lm_loss(c, cfg, params, num_batches, inputs)
  return out
