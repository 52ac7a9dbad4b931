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

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clsalign_jax import artifacts, masks
from clsalign_jax import model as model_lib
from clsalign_jax.data.templates import ChatTemplate, encode_prompt
from clsalign_jax.data.tokenizer import Tokenizer
from clsalign_jax.decode import DecodeConfig, SamplingParams, bucket, decode, pack_inputs, refusal_ids, row_results

Array = jax.Array


# ----- encoded rows -------------------------------------------------------------------------------


class Encoded(NamedTuple):
  """One prompt row: `prompt` = [CLS, BOS, ...] ids, the query's half-open token span, and
  attacker-prefilled response ids (fed as response tokens, not generated)."""

  prompt: tuple[int, ...]
  query_span: tuple[int, int]
  prefill: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Next-token choice of one generation (see `decode.SamplingParams`)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Generation:
  """One generated response. Indices are in continuation coordinates (0 = first token after
  any attacker prefill); -1 means "did not happen"."""

  response: str  # the model's continuation, special tokens dropped
  response_ids: list[int]
  prompt_tokens: int
  p_initial: float  # prompt-time p(malicious)
  initial_malicious: bool
  refusal_inserted: bool
  insert_index: int
  trigger_index: int
  false_alarms: int
  cls_trace: list[float]  # p(malicious) at each re-classification


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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_jit(
  cfg: model_lib.ModelConfig, response_sees_cls: bool, params, tokens_BT, input_len_B, prompt_len_B, query_span_B2, at_B
):
  out = teacher_forced(
    model_lib.Transformer(cfg), params, tokens_BT, input_len_B, prompt_len_B, query_span_B2, response_sees_cls
  )
  logits_BV = jnp.take_along_axis(out.logits_BTV, at_B[:, None, None], axis=1)[:, 0]
  return next_token_logprobs(out.logits_BTV, tokens_BT), logits_BV, jax.nn.sigmoid(out.cls_logit_B)


# ----- the target model ---------------------------------------------------------------------------


class TargetModel:
  """A loaded model with its tokenizer, chat template and decode settings."""

  def __init__(
    self,
    name: str,
    cfg: model_lib.ModelConfig,
    params: dict,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    dcfg: DecodeConfig = DecodeConfig(),
    batch_size: int = 8,
  ):
    if cfg.vocab_size != tokenizer.vocab_size:
      raise ValueError(
        f"{name}: model vocabulary {cfg.vocab_size} != tokenizer vocabulary "
        f"{tokenizer.vocab_size} (the CLS id must be one past both)"
      )
    self.name, self.tokenizer, self.template, self.dcfg = name, tokenizer, template, dcfg
    self.batch_size = batch_size
    # Evaluation runs the plain per-layer layout: no remat, no scan bookkeeping at decode time.
    self.cfg = cfg.replace(scan_layers=False, remat_policy="none")
    # Onto the default device explicitly: a training run's params are restored onto the CPU, and a
    # bare device_put would leave such committed arrays there (every decode would then run on the CPU).
    self.params = jax.device_put(model_lib.to_layout(params, self.cfg), jax.devices()[0])
    self.eos_id = template.end.id(tokenizer)

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
  ) -> TargetModel:
    """`tokenizer` / `template` 'auto': the run's (artifacts). `decode` None: the checkpoint's
    decode settings (a CLS run's strategic decoding, else the plain model); a dict is a complete
    variant on DecodeConfig's defaults, except that response rows read the CLS as the run was
    trained to unless the dict says otherwise."""
    loaded = artifacts.load(
      checkpoint, tokenizer=tokenizer, template=template, template_kwargs=template_kwargs, model_fields=model
    )
    if decode is None:
      dcfg = loaded.decode_config()
    else:
      trained = {"response_sees_cls": loaded.facts.response_sees_cls} if loaded.facts.cls_trained else {}
      dcfg = DecodeConfig(**{**trained, **decode})
    return cls(name, loaded.cfg, loaded.params, loaded.tokenizer, loaded.template, dcfg, batch_size)

  # ----- rows ---------------------------------------------------------------------------------

  def encode(self, query: str, prefill: str = "", raw: bool = False, raw_prefix: str = "") -> Encoded:
    """The row for a user query. `raw` feeds `raw_prefix + query` without the chat template
    (Huang et al.'s setting); the CLS then reads the query text itself."""
    tok = self.tokenizer
    if not raw:
      enc = encode_prompt(tok, self.template, query, prefill)
      p0, p1 = enc.prefill_span
      return Encoded(tuple(enc.tokens[:p0].tolist()), tuple(enc.query_span), tuple(enc.tokens[p0:p1].tolist()))
    head = [tok.cls_id, tok.bos_id] + (tok.encode(raw_prefix) if raw_prefix else [])
    body = tok.encode_continuation(query) if raw_prefix else tok.encode(query)
    prompt = head + body
    fill = tok.encode_continuation(prefill) if prefill else []
    return Encoded(tuple(prompt), (len(head), len(prompt)), tuple(fill))

  # ----- generation ---------------------------------------------------------------------------

  def generate(
    self,
    rows: Sequence[Encoded],
    sampling: Sequence[Sampling],
    dcfg: DecodeConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
  ) -> list[Generation]:
    """Generate for every row; rows are grouped by padded length and run in fixed-size batches
    (short batches are filled with copies of their first row) so each bucket compiles once."""
    dcfg = dcfg or self.dcfg
    refusal_R = jnp.asarray(refusal_ids(self.tokenizer, dcfg), jnp.int32)
    results: list[Generation | None] = [None] * len(rows)
    for idx in self._batches(rows):
      batch = [rows[i] for i in idx] + [rows[idx[0]]] * (self.batch_size - len(idx))
      samp = [sampling[i] for i in idx] + [sampling[idx[0]]] * (self.batch_size - len(idx))
      inputs = pack_inputs([r.prompt for r in batch], [r.query_span for r in batch], [r.prefill for r in batch])
      params_B = SamplingParams(
        jnp.asarray([s.temperature for s in samp], jnp.float32),
        jnp.asarray([s.top_k for s in samp], jnp.int32),
        jnp.asarray([s.top_p for s in samp], jnp.float32),
        jnp.asarray([s.seed for s in samp], jnp.int32),
      )
      out = decode(self.params, inputs, refusal_R, params_B, cfg=self.cfg, dcfg=dcfg, eos_id=self.eos_id)
      for i, res in zip(idx, row_results(out, inputs)):
        results[i] = self._generation(rows[i], res)
      if on_batch:
        on_batch(len(idx))
    return results

  def _generation(self, row: Encoded, res) -> Generation:
    ids = res.response_ids[res.prefill_len :]
    shift = lambda i: i - res.prefill_len if i >= 0 else -1
    return Generation(
      response=self.tokenizer.decode([i for i in ids if i != self.eos_id], skip_special_tokens=True),
      response_ids=ids,
      prompt_tokens=len(row.prompt),
      p_initial=res.p_initial,
      initial_malicious=res.initial_malicious,
      refusal_inserted=res.insert_index >= 0,
      insert_index=shift(res.insert_index),
      trigger_index=shift(res.trigger_index),
      false_alarms=res.false_alarms,
      cls_trace=[round(p, 4) for _, _, p in res.trace],
    )

  def _batches(self, rows: Sequence[Encoded]) -> list[list[int]]:
    by_bucket: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
      by_bucket.setdefault(bucket(len(r.prompt) + len(r.prefill)), []).append(i)
    B = self.batch_size
    return [ids[k : k + B] for _, ids in sorted(by_bucket.items()) for k in range(0, len(ids), B)]

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
      logp_BT, logits_BV, p_B = jax.device_get(
        _score_jit(
          self.cfg, self.dcfg.response_sees_cls, self.params, tokens_BT, input_len_B, prompt_len_B, span_B2, at_B
        )
      )
      for b, i in enumerate(idx):
        start = at_B[b]
        logps[i] = logp_BT[b, start : start + len(continuations[i])]
        next_logits[i] = logits_BV[b]
        p_mal[i] = p_B[b]
    return Scores(logps, next_logits, p_mal)
