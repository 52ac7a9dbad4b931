"""The evaluation room's one seam to the model and decode rooms.

Everything the harness, attacks, judges, utility and probe need from a model goes through
`TargetModel`: loading a variant's weights and tokenizer, turning attack cases into token rows,
batched generation through `clsalign_jax.decode`, and teacher-forced scoring (the log-likelihood
of a continuation, the next-token logits at the first response position, the CLS probability).

Checkpoint specs (a variant's `checkpoint`) are those of `clsalign_jax.artifacts`: smollm2,
gguf:FILE, hf:DIR, orbax:RUN_DIR[@STEP], random:PRESET[@SEED] (random:SEED with the variant's
`model` fields) or a bare path. The tokenizer, the template and whether response rows read the
CLS come from the run's facts unless the variant names them (artifacts' precedence).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clsalign_jax import artifacts, masks
from clsalign_jax import model as model_lib
from clsalign_jax.decode import bucket
from clsalign_jax.decode.sampling import Sampling  # noqa: F401 - the evaluation room's names for them
from clsalign_jax.decode.text import Decoder, Encoded, Generation, gather_rows  # noqa: F401
from clsalign_jax.sharding import Layout

Array = jax.Array


class Scores(NamedTuple):
  """Teacher-forced pass over prompt + prefill + continuation rows."""

  continuation_logprobs: list[np.ndarray]  # per row, log p of each continuation token
  next_logits: np.ndarray  # [B, V] logits at the last prompt/prefill position (first response token)
  p_malicious: np.ndarray  # [B] the CLS judging the query (Rule 4)


def teacher_forced(
  model: model_lib.Transformer,
  params,
  tokens_BT: Array,
  input_len_B: Array,
  prompt_len_B: Array,
  query_span_B2: Array,
  response_sees_cls: bool = True,
):
  """No-cache forward with the prompt-pass mask of decoding: the CLS reads the query, rows from
  `prompt_len` on are response rows (they read the CLS, as generated or prefilled tokens do,
  unless `response_sees_cls` is False: then every row but the CLS's is the plain causal model)."""
  T = tokens_BT.shape[1]
  mask_BTT = masks.prefill_mask(
    input_len_B, prompt_len_B, query_span_B2, T, T, model.cfg.sliding_window, response_sees_cls=response_sees_cls
  )
  positions_BT = jnp.broadcast_to(jnp.arange(T), tokens_BT.shape)
  return model.apply({"params": params}, tokens_BT, positions_BT, mask_BTT, cls_row=0)


def next_token_logprobs(logits_BTV: Array, tokens_BT: Array) -> Array:
  """[B, T]: log p(tokens[t + 1] | ..t) at column t; the last column is 0."""
  # Gather, then subtract the normaliser: no [B, T, V] log-softmax is materialised.
  picked_BT = jnp.take_along_axis(logits_BTV[:, :-1], tokens_BT[:, 1:, None], axis=-1)[..., 0]
  logp_BT = picked_BT - jax.nn.logsumexp(logits_BTV[:, :-1], axis=-1)
  return jnp.pad(logp_BT, ((0, 0), (0, 1)))


def _score(
  cfg: model_lib.ModelConfig, response_sees_cls: bool, params, tokens_BT, input_len_B, prompt_len_B, query_span_B2, at_B
):
  out = teacher_forced(
    model_lib.Transformer(cfg), params, tokens_BT, input_len_B, prompt_len_B, query_span_B2, response_sees_cls
  )
  logits_BV = jnp.take_along_axis(out.logits_BTV, at_B[:, None, None], axis=1)[:, 0]
  return next_token_logprobs(out.logits_BTV, tokens_BT), logits_BV, jax.nn.sigmoid(out.cls_logit_B)


_score_jit = jax.jit(_score, static_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def _sharded_score(layout: Layout, cfg: model_lib.ModelConfig, response_sees_cls: bool):
  """`_score` with explicit shardings: params by the layout's rules, rows split over its row shards."""
  rows = layout.rows
  return jax.jit(
    functools.partial(_score, cfg, response_sees_cls),
    in_shardings=(layout.params(model_lib.abstract_params(cfg)), rows(2), rows(1), rows(1), rows(2), rows(1)),
    out_shardings=(rows(2), rows(2), rows(1)),
  )


# ----- the target model ---------------------------------------------------------------------------


class TargetModel(Decoder):
  """A loaded model with its tokenizer, chat template and decode settings: `Decoder`'s generation
  plus loading from a checkpoint spec and teacher-forced scoring."""

  @classmethod
  def load(
    cls,
    name: str,
    checkpoint: str,
    tokenizer: str = "auto",
    template: str = "auto",
    template_kwargs: dict | None = None,
    model: dict | None = None,
    decode: dict | None = None,
    batch_size: int = 8,
    layout: Layout | None = None,
  ) -> TargetModel:
    """`tokenizer` / `template` 'auto': the run's (artifacts). Decode settings: `decode`'s keys over
    the checkpoint's (`artifacts.Loaded.decode_config`: a CLS run's recorded settings, else the
    plain model). `layout`: the mesh the params are restored onto and decoding runs on."""
    loaded = artifacts.load(
      checkpoint,
      tokenizer=tokenizer,
      template=template,
      template_kwargs=template_kwargs,
      model_fields=model,
      layout=layout,
    )
    dcfg = loaded.decode_config(**dict(decode or {}))
    return cls(name, loaded.cfg, loaded.params, loaded.tokenizer, loaded.template, dcfg, batch_size, layout)

  # ----- scoring ------------------------------------------------------------------------------

  def score(self, rows: Sequence[Encoded], continuations: Sequence[Sequence[int]] | None = None) -> Scores:
    """Teacher-forced log-likelihood of each continuation after its row (prompt + prefill), the
    logits for the first token after the prefill, and the prompt-time p(malicious), under the
    attention of this model's decoding (`dcfg.response_sees_cls`)."""
    continuations = continuations or [()] * len(rows)
    B = self.batch_size
    logps: list[np.ndarray | None] = [None] * len(rows)
    V = self.cfg.vocab_size
    next_logits = np.zeros((len(rows), V), np.float32)
    p_mal = np.zeros(len(rows), np.float32)
    full = [list(r.prompt) + list(r.prefill) + list(c) for r, c in zip(rows, continuations)]
    order = sorted(range(len(rows)), key=lambda i: len(full[i]))
    for k in range(0, len(order), B):
      idx = order[k : k + B]
      T = bucket(max(len(full[i]) for i in idx))
      tokens_BT = np.zeros((B, T), np.int32)
      input_len_B = np.ones(B, np.int32)
      prompt_len_B = np.ones(B, np.int32)
      span_B2 = np.zeros((B, 2), np.int32)
      at_B = np.zeros(B, np.int32)
      for b, i in enumerate(idx):
        tokens_BT[b, : len(full[i])] = full[i]
        input_len_B[b] = len(full[i])
        prompt_len_B[b] = len(rows[i].prompt)
        span_B2[b] = rows[i].query_span
        at_B[b] = len(rows[i].prompt) + len(rows[i].prefill) - 1
      logp_BT, logits_BV, p_B = self._score_batch(tokens_BT, input_len_B, prompt_len_B, span_B2, at_B)
      for b, i in enumerate(idx):
        start = at_B[b]
        logps[i] = logp_BT[b, start : start + len(continuations[i])]
        next_logits[i] = logits_BV[b]
        p_mal[i] = p_B[b]
    return Scores(logps, next_logits, p_mal)

  def _score_batch(self, *rows_host) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if self.layout is None:
      return jax.device_get(_score_jit(self.cfg, self.dcfg.response_sees_cls, self.params, *rows_host))
    fn = _sharded_score(self.layout, self.cfg, self.dcfg.response_sees_cls)
    placed = [self.layout.place(x, self.layout.rows(x.ndim)) for x in rows_host]
    with self.layout.activated():
      return gather_rows(fn(self.params, *placed))
