"""Prefill and decode in one jitted function, with CLS re-classification and strategic decoding.

Layout: every row keeps its own positions, and the token at position p lives in KV-cache slot
p; the CLS sits in slot 0, BOS in slot 1. Prompts are right-padded to a bucketed length P and
the cache has P + max_new_tokens slots, so rows of different lengths need no left padding and
a rollback is just a shorter `length` (stale slots past it are masked, then overwritten).

Each loop step feeds one pending token per row. On steps the schedule selects (and when some
row still needs it), the CLS is a second query row of the same forward pass (token id cls_id,
position 0, slot 0): weights are read once, its new K/V overwrite slot 0 at every layer, and the
safety head reads it. Other steps run a one-row forward inside an inner loop, so they do not
pay for the CLS row.

Per-row state machine (docs/method.md §3): the prompt-time judgment picks Rule 1 (malicious: the
refusal prefix is forced right after the prompt and any attacker prefill) or Rule 2 (benign).
A benign row whose re-classification crosses the threshold records S_t (the slot of the token
fed at that step) and follows Rule 3; a benign result before τ malicious events is a false
alarm (back to Rule 2); τ of them confirm the flip: the row is cut back to S_t (cache and
tokens), the refusal prefix is teacher-forced from there, and the row stops re-classifying.
With `end_after_refusal` a row ends on the last token of a refusal prefix it was forced to
insert, by either rule, instead of continuing after it.

Code map: `RowState` is the per-row machine and `transition` its step (pure, over [B] arrays,
tested without the model); `wants_cls` and `due` pick the rows a step re-classifies; `running`
is the stop condition; `_State` is the loop carry; `_Context` is what the steps read (params,
inputs, settings), and `_prefill`, `_forward`, `_step` and `_run` wire the model into them.
`register_stream` lets a host callback watch the loop step by step (serving streams with it).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from clsalign_jax import masks
from clsalign_jax.decode.config import DecodeConfig
from clsalign_jax.decode.sampling import Sampling, sample_tokens
from clsalign_jax.model import ModelConfig, Transformer, abstract_params, init_cache, to_layout
from clsalign_jax.sharding import Layout

Array = jax.Array

# Row states: the inference rule the CLS follows, or CONFIRMED (flip confirmed: no more
# re-classification, the last malicious CLS state stays in slot 0).
CONFIRMED = 0
MALICIOUS, BENIGN, TRANSITION = masks.RULE_MALICIOUS, masks.RULE_BENIGN, masks.RULE_TRANSITION


class DecodeInputs(NamedTuple):
  """Right-padded rows `[CLS, BOS, template + query ..., attacker prefill ..., pad ...]`."""

  tokens_BP: Array
  prompt_len_B: Array  # first response slot: where an attacker prefill (or the response) starts
  input_len_B: Array  # prompt + attacker prefill
  query_span_B2: Array  # half-open [start, end) of the user query


class DecodeOutput(NamedTuple):
  tokens_BS: Array  # rows as in the cache: the response is tokens_BS[b, prompt_len_B[b]:end_B[b]]
  prompt_len_B: Array
  end_B: Array  # exclusive end of the response; a sampled EOS is included
  p_initial_B: Array  # prompt-time p(malicious)
  initial_malicious_B: Array
  cls_trace_BN: Array  # p(malicious) at each loop step; NaN where the row did not re-classify
  fed_pos_BN: Array  # slot of the token fed at each loop step; -1 once the row is done
  trigger_step_B: Array  # loop step at which the confirmed flip started; -1 if none
  trigger_pos_B: Array  # S_t, the slot of the token fed at that step; -1 if none
  insert_pos_B: Array  # slot where the refusal prefix starts; -1 if none was inserted
  false_alarms_B: Array  # flips withdrawn before τ malicious re-classifications
  num_steps: Array  # loop steps run (the loop ends early once every row is done)
  logits_BNV: Array | None  # with return_logits: column 0 from the prompt pass, s + 1 from step s


class RowState(NamedTuple):
  """Where each row stands in the strategic-decoding state machine; every field is [B] int32 or
  bool. `transition` advances it by one loop step, from arrays alone (no model, no cache)."""

  # Filled slots: the pending token (fed at the next step) sits in seq_BS[b, length_B[b]], so
  # length_B is also the slot that token's K/V will occupy. A rollback sets it back to S_t.
  length_B: Array
  # The row has stopped (EOS sampled, max_new_tokens reached, or with end_after_refusal its refusal
  # prefix forced in full): later steps feed it nothing and leave every field of it unchanged.
  done_B: Array
  # The rule the CLS follows: MALICIOUS (Rule 1), BENIGN (Rule 2), TRANSITION (Rule 3: a flip
  # awaits confirmation), or CONFIRMED (no more re-classification).
  mode_B: Array
  # S_t, the slot of the token fed at the step the flip was first seen; -1 unless a flip is
  # pending or confirmed (a withdrawn flip resets it).
  trigger_pos_B: Array
  # The loop step of that flip; -1 likewise.
  trigger_step_B: Array
  # Malicious re-classifications since the flip, the flip itself included (τ's events).
  malicious_run_B: Array
  # Index of the next refusal token to force; R when none is pending.
  refusal_next_B: Array
  # Slot where the refusal prefix starts; -1 while none was inserted.
  insert_pos_B: Array
  # Flips withdrawn (a benign re-classification in Rule 3 before τ malicious ones).
  false_alarms_B: Array


class _State(NamedTuple):
  """The decode loop's carry: everything one loop step reads and writes."""

  step: Array  # the loop step about to run (int32 scalar); loop step s feeds the s-th pending token
  cache: tuple  # K and V of every layer, [L, B, G, S, H] each; slot 0 holds the latest CLS K/V of the row
  seq_BS: Array  # every row's tokens by slot, the pending one included; slots past it are stale
  rows: RowState
  trace_BN: Array  # p(malicious) of each re-classification by loop step; NaN where none ran
  fed_pos_BN: Array  # slot of the token fed at each loop step; -1 where the row was done
  logits_BNV: Array | None  # with return_logits: LM logits, column s + 1 from loop step s


def transition(
  rows: RowState,
  step: Array,
  judged_B: Array,
  malicious_B: Array,
  sampled_B: Array,
  refusal_R: Array,
  eos: Array,
  input_len_B: Array,
  dcfg: DecodeConfig,
) -> tuple[RowState, Array]:
  """One loop step of the per-row state machine (docs/method.md §3), with the rollback.

  The step fed the pending token of every row that is not done (at slot rows.length_B); rows in
  `judged_B` (never a done row) were re-classified, `malicious_B` (within judged_B) of them above
  the threshold. `sampled_B` is what the LM proposes next. Returns the new state and the token
  to write at slot new.length_B (rows already done keep their state; their token is not written).

  Rule 2 → 3 on a malicious judgement; in Rule 3 a malicious judgement counts towards τ and a
  benign one withdraws the flip (back to Rule 2, a false alarm). Once τ holds the row is
  CONFIRMED and, with strategic decoding, cut back to S_t (+1 with keep_trigger_token) where
  the refusal prefix is forced one token per step. Rules 1 and CONFIRMED ignore judgements.
  With end_after_refusal the row is done once the last refusal token is the pending one.
  """
  R = refusal_R.shape[0]
  active_B = ~rows.done_B
  pos_B = rows.length_B
  was_benign_B = rows.mode_B == BENIGN
  was_transition_B = rows.mode_B == TRANSITION
  flips_B = was_benign_B & malicious_B
  withdrawn_B = was_transition_B & judged_B & ~malicious_B
  trigger_pos_B = jnp.where(flips_B, pos_B, jnp.where(withdrawn_B, -1, rows.trigger_pos_B))
  trigger_step_B = jnp.where(flips_B, step, jnp.where(withdrawn_B, -1, rows.trigger_step_B))
  run_B = jnp.where(
    flips_B,
    1,
    jnp.where(
      was_transition_B & malicious_B, rows.malicious_run_B + 1, jnp.where(withdrawn_B, 0, rows.malicious_run_B)
    ),
  )
  mode_B = jnp.where(flips_B, TRANSITION, jnp.where(withdrawn_B, BENIGN, rows.mode_B))
  if dcfg.tau_unit == "events":
    held_B = run_B >= dcfg.tau
  else:
    held_B = step - trigger_step_B + 1 >= dcfg.tau
  confirmed_B = (flips_B | (was_transition_B & malicious_B)) & held_B
  mode_B = jnp.where(confirmed_B, CONFIRMED, mode_B)

  # Next pending token: rollback + first refusal token, a forced refusal token, or the sample.
  rollback_B = confirmed_B & dcfg.strategic_decoding
  cut_len_B = trigger_pos_B + int(dcfg.keep_trigger_token)
  forcing_B = rows.refusal_next_B < R
  forced_B = refusal_R[jnp.minimum(rows.refusal_next_B, R - 1)]
  next_B = jnp.where(rollback_B, refusal_R[0], jnp.where(forcing_B, forced_B, sampled_B))
  refusal_next_B = jnp.where(rollback_B, 1, jnp.where(forcing_B, rows.refusal_next_B + 1, rows.refusal_next_B))
  length_B = jnp.where(active_B, jnp.where(rollback_B, cut_len_B, pos_B + 1), rows.length_B)
  # The pending token is the prefix's last: the row ends with it in the response, as with a sampled EOS.
  refusal_ends_B = (rollback_B | forcing_B) & (refusal_next_B == R) & dcfg.end_after_refusal
  ends_B = (
    (~rollback_B & ~forcing_B & (next_B == eos)) | refusal_ends_B | (length_B + 1 - input_len_B >= dcfg.max_new_tokens)
  )
  return RowState(
    length_B=length_B,
    done_B=rows.done_B | (active_B & ends_B),
    mode_B=jnp.where(active_B, mode_B, rows.mode_B),
    trigger_pos_B=trigger_pos_B,
    trigger_step_B=trigger_step_B,
    malicious_run_B=run_B,
    refusal_next_B=jnp.where(active_B, refusal_next_B, rows.refusal_next_B),
    insert_pos_B=jnp.where(rollback_B, cut_len_B, rows.insert_pos_B),
    false_alarms_B=rows.false_alarms_B + withdrawn_B.astype(jnp.int32),
  ), next_B


def wants_cls(rows: RowState, visible_start_B: Array, dcfg: DecodeConfig) -> Array:
  """[B] rows whose CLS would change if re-read now."""
  # A Rule-1 window stops growing after r1 response tokens; re-reading it changes nothing.
  rule1_open_B = (rows.length_B < visible_start_B + dcfg.r1) | (not dcfg.strategic_attention)
  return ~rows.done_B & (rows.mode_B != CONFIRMED) & ((rows.mode_B != MALICIOUS) | rule1_open_B)


def due(rows: RowState, step: Array, dcfg: DecodeConfig) -> Array:
  """[B] rows the schedule re-classifies at loop step `step`. Under `annealing` a row in Rule 3 is
  re-read every step until its flip is confirmed or withdrawn: the gaps reach 64 steps, so a flip
  first seen at step 64 or later could otherwise never gather its τ events. (`periodic` keeps its
  own steps; its late flips are what `tau_unit="steps"` is for.)"""
  if dcfg.schedule != "annealing":
    return dcfg.reclassify_at(step) & jnp.ones_like(rows.done_B)
  return dcfg.reclassify_at(step) | (rows.mode_B == TRANSITION)


def running(st: _State, max_steps: int) -> Array:
  """The stop condition: steps left and some row not done."""
  return (st.step < max_steps) & ~jnp.all(st.rows.done_B)


def bucket(length: int, multiple: int = 64) -> int:
  """Prompt lengths are padded up to a multiple of this, so nearby lengths share one compile."""
  return -(-length // multiple) * multiple


def pack_inputs(
  prompts: Sequence[Sequence[int]],
  query_spans: Sequence[Sequence[int]],
  prefills: Sequence[Sequence[int]] | None = None,
  pad_to: int | None = None,
  bucket_multiple: int = 64,
) -> DecodeInputs:
  """Right-pad token-id prompts (each starting with CLS, BOS) plus optional attacker prefills."""
  prefills = prefills or [[] for _ in prompts]
  if not len(prompts) == len(query_spans) == len(prefills):
    raise ValueError("prompts, query_spans and prefills must have the same length")
  rows = [list(p) + list(f) for p, f in zip(prompts, prefills)]
  longest = max(len(r) for r in rows)
  P = pad_to if pad_to is not None else bucket(longest, bucket_multiple)
  if P < longest:
    raise ValueError(f"pad_to={P} is shorter than the longest prompt + prefill ({longest})")
  tokens_BP = np.zeros((len(rows), P), np.int32)
  for b, r in enumerate(rows):
    tokens_BP[b, : len(r)] = r
  return DecodeInputs(
    jnp.asarray(tokens_BP),
    jnp.asarray([len(p) for p in prompts], jnp.int32),
    jnp.asarray([len(r) for r in rows], jnp.int32),
    jnp.asarray(query_spans, jnp.int32),
  )


def _take_B(x_BN: Array, i_B: Array) -> Array:
  """x[b, i_B[b]], as a select-and-sum: elementwise over rows, so a row-sharded x stays sharded
  (a gather with row indices makes the partitioner all-gather the rows)."""
  hit_BN = jnp.arange(x_BN.shape[1])[None, :] == i_B[:, None]
  return jnp.sum(jnp.where(hit_BN, x_BN, jnp.zeros((), x_BN.dtype)), axis=1)


def _put_B(x_BN: Array, i_B: Array, v_B: Array) -> Array:
  """x[b, i_B[b]] = v_B[b]; an index past the end leaves the row untouched (a select, as `_take_B`)."""
  hit_BN = jnp.arange(x_BN.shape[1])[None, :] == i_B[:, None]
  return jnp.where(hit_BN, v_B[:, None].astype(x_BN.dtype), x_BN)


def decode(
  params,
  inputs: DecodeInputs,
  refusal_R: Array,
  sampling: Sampling,
  p_override_BN: Array | None = None,
  *,
  cfg: ModelConfig,
  dcfg: DecodeConfig,
  eos_id: int | None,
  return_logits: bool = False,
  stream_to: int | None = None,
  layout: Layout | None = None,
) -> DecodeOutput:
  """Generate for a batch of packed prompts: one compiled program per shape bucket and set of
  static options, however the arguments are passed.

  params: in the layout of `cfg` (see `model.to_layout`). refusal_R: the refusal-prefix ids
  (R >= 1). eos_id: None never stops early (benchmarks). p_override_BN ([B, max_steps + 1],
  NaN = use the model): replaces p(malicious) at the prompt (column 0) and at loop step s
  (column s + 1), to drive the state machine in tests and experiments; the CLS K/V written
  to the cache are still the model's. stream_to: an id from `register_stream`; its callback
  then sees a `StreamEvent` after the prompt pass and after every loop step (the id is traced,
  so streams share one compile). layout: params and rows placed over a mesh (`Layout`); the
  batch must divide into its row shards (`Layout.pad_rows`).
  """
  # EOS is traced (-1 never matches), so changing it does not recompile.
  eos = jnp.int32(-1 if eos_id is None else eos_id)
  stream = stream_to is not None
  stream_id = jnp.int32(stream_to if stream else -1)
  args = (params, inputs, refusal_R, sampling, p_override_BN, eos, stream_id)
  if layout is None:
    return _decode_jit(*args, cfg, dcfg, return_logits, stream)
  fn = _sharded_decode(layout, cfg, dcfg, return_logits, stream, p_override_BN is not None)
  with layout.activated():
    return fn(*args)


def _override(p_B: Array, p_override_BN: Array | None, column) -> Array:
  """p(malicious) with the forced values of `column` where they are not NaN."""
  if p_override_BN is None:
    return p_B
  forced_B = p_override_BN[:, column]
  return jnp.where(jnp.isnan(forced_B), p_B, forced_B)


# ----- streaming ----------------------------------------------------------------------------------


class StreamEvent(NamedTuple):
  """What a stream callback sees after the prompt pass (step 0) and after loop step s (step s + 1);
  host numpy arrays over the batch's rows. Events may arrive out of order on a multi-device mesh:
  a handler keeps the highest `step` it has seen."""

  step: int
  seq_BS: np.ndarray  # every row's tokens by slot (the response starts at DecodeInputs.prompt_len_B)
  # Slots [0, stable_B) are final: no later rollback can change them (a row in Rule 3 may still be
  # cut back to S_t, and in Rule 2 the pending token may be dropped by a flip at the next step).
  stable_B: np.ndarray
  done_B: np.ndarray  # the row has ended; its response is seq_BS[b, prompt_len_B[b]:stable_B[b]]
  p_B: np.ndarray  # p(malicious) of a re-classification at this step; NaN where none ran
  insert_pos_B: np.ndarray  # slot where the refusal prefix starts; -1 while none was inserted


_STREAMS: dict[int, Callable[[StreamEvent], None]] = {}
_stream_ids = itertools.count()


def register_stream(fn: Callable[[StreamEvent], None]) -> int:
  """An id to pass as `decode(..., stream_to=id)`; `fn` runs on the host during decoding."""
  i = next(_stream_ids) % (2**31 - 1)
  _STREAMS[i] = fn
  return i


def unregister_stream(i: int) -> None:
  _STREAMS.pop(i, None)


def _deliver(stream_id, step, seq_BS, stable_B, done_B, p_B, insert_pos_B) -> None:
  fn = _STREAMS.get(int(stream_id))
  if fn is not None:
    fn(StreamEvent(int(step), *(np.asarray(x) for x in (seq_BS, stable_B, done_B, p_B, insert_pos_B))))


def _stable_B(rows: RowState, dcfg: DecodeConfig) -> Array:
  """StreamEvent.stable_B: the slots no later rollback can change (never past the pending token)."""
  all_B = rows.length_B + 1  # every filled slot, the pending token included
  if not dcfg.strategic_decoding:
    return all_B  # nothing is ever rolled back
  # Rule 3 may cut back to S_t; in Rule 2 a flip at the next step may drop the pending token.
  stable_B = jnp.where(rows.mode_B == TRANSITION, rows.trigger_pos_B + int(dcfg.keep_trigger_token), all_B)
  stable_B = jnp.where(rows.mode_B == BENIGN, rows.length_B, stable_B)
  return jnp.where(rows.done_B, all_B, stable_B)


def _report(ctx: _Context, st: _State, p_B: Array) -> None:
  if ctx.stream_id is None:
    return
  io_callback(
    _deliver,
    None,
    ctx.stream_id,
    st.step,
    st.seq_BS,
    _stable_B(st.rows, ctx.dcfg),
    st.rows.done_B,
    p_B,
    st.rows.insert_pos_B,
    ordered=False,
  )


# ----- the loop -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Context:
  """What every loop step reads and none writes, built once per trace by `_decode_impl`."""

  model: Transformer
  params: Any
  cfg: ModelConfig
  dcfg: DecodeConfig
  inputs: DecodeInputs
  refusal_R: Array  # the refusal-prefix ids
  sampling: Sampling
  p_override_BN: Array | None  # forced p(malicious) by column (see `decode`)
  eos: Array  # int32 scalar; -1 never matches
  S: int  # cache slots: bucketed prompt length + max_new_tokens
  visible_start_B: Array  # first response slot the CLS may read under Rules 1–3
  stream_id: Array | None  # traced stream id; None: no host callbacks are traced

  @property
  def B(self) -> int:
    return self.inputs.tokens_BP.shape[0]

  def token_mask(self, pos_B: Array) -> Array:
    return masks.decode_token_mask(
      pos_B, num_slots=self.S, sliding_window=self.cfg.sliding_window, response_sees_cls=self.dcfg.response_sees_cls
    )


def _prefill(ctx: _Context) -> tuple[_State, Array, Array, Array]:
  """The prompt pass: rows in slots 0..P-1, padding dropped; the CLS judges the query only, and
  only the last input row needs LM logits. Returns the loop's first carry, the prompt-time
  p(malicious) and verdict, and the LM logits of the last input row."""
  cfg, dcfg, inputs, refusal_R = ctx.cfg, ctx.dcfg, ctx.inputs, ctx.refusal_R
  B, P = inputs.tokens_BP.shape
  S, N, R = ctx.S, dcfg.max_steps, refusal_R.shape[0]
  input_len_B, prompt_len_B = inputs.input_len_B, inputs.prompt_len_B
  slots_BP = jnp.where(jnp.arange(P)[None, :] < input_len_B[:, None], jnp.arange(P)[None, :], S)
  out = ctx.model.apply(
    {"params": ctx.params},
    inputs.tokens_BP,
    jnp.broadcast_to(jnp.arange(P), (B, P)),
    masks.prefill_mask(
      input_len_B,
      prompt_len_B,
      inputs.query_span_B2,
      P,
      S,
      cfg.sliding_window,
      response_sees_cls=dcfg.response_sees_cls,
    ),
    cache=init_cache(cfg, B, S),
    slots_BT=slots_BP,
    cls_row=0,
    lm_rows_BK=(input_len_B - 1)[:, None],
  )
  p0_B = _override(jax.nn.sigmoid(out.cls_logit_B), ctx.p_override_BN, 0)
  malicious0_B = p0_B > dcfg.threshold
  last_logits_BV = out.logits_BTV[:, 0]
  refuse0_B = malicious0_B & dcfg.strategic_decoding
  first_B = jnp.where(refuse0_B, refusal_R[0], sample_tokens(last_logits_BV, ctx.sampling, 0))
  state = _State(
    step=jnp.int32(0),
    cache=out.cache,
    seq_BS=_put_B(jnp.pad(inputs.tokens_BP, ((0, 0), (0, S - P))), input_len_B, first_B),
    rows=RowState(
      length_B=input_len_B,
      # A one-token refusal prefix forced at the prompt is already complete: the row ends on it.
      done_B=(~refuse0_B & (first_B == ctx.eos))
      | (refuse0_B & (R == 1) & dcfg.end_after_refusal)
      | (dcfg.max_new_tokens <= 1),
      mode_B=jnp.where(malicious0_B, MALICIOUS, BENIGN).astype(jnp.int32),
      trigger_pos_B=jnp.full((B,), -1, jnp.int32),
      trigger_step_B=jnp.full((B,), -1, jnp.int32),
      malicious_run_B=jnp.zeros((B,), jnp.int32),
      refusal_next_B=jnp.where(refuse0_B, 1, R).astype(jnp.int32),
      insert_pos_B=jnp.where(refuse0_B, input_len_B, -1),
      false_alarms_B=jnp.zeros((B,), jnp.int32),
    ),
    trace_BN=jnp.full((B, N), jnp.nan, jnp.float32),
    fed_pos_BN=jnp.full((B, N), -1, jnp.int32),
    logits_BNV=None,
  )
  return state, p0_B, malicious0_B, last_logits_BV


def _forward(ctx: _Context, st: _State, tok_B, pos_B, tok_slot_B, judged_B, with_cls: bool):
  """LM logits of the fed tokens, p(malicious) (NaN without the CLS row) and the new cache.
  With `with_cls` the CLS is a second query row of the same pass (position 0, slot 0 for the
  judged rows; the others' CLS K/V are dropped)."""
  cfg, dcfg, B, S = ctx.cfg, ctx.dcfg, ctx.B, ctx.S
  if not with_cls:
    o = ctx.model.apply(
      {"params": ctx.params},
      tok_B[:, None],
      pos_B[:, None],
      ctx.token_mask(pos_B)[:, None],
      cache=st.cache,
      slots_BT=tok_slot_B[:, None],
      cls_row=None,
    )
    return o.logits_BTV[:, 0], jnp.full((B,), jnp.nan, jnp.float32), o.cache
  cls_mask_BS = masks.cls_inference_mask(
    st.rows.mode_B,
    pos_B,
    ctx.inputs.query_span_B2,
    ctx.visible_start_B,
    st.rows.trigger_pos_B,
    S,
    r1=dcfg.r1,
    r2=dcfg.r2,
    r3=dcfg.r3,
    rule2_query=dcfg.rule2_include_query,
    strategic=dcfg.strategic_attention,
  )
  o = ctx.model.apply(
    {"params": ctx.params},
    jnp.stack([tok_B, jnp.full((B,), cfg.cls_id, jnp.int32)], axis=1),
    jnp.stack([pos_B, jnp.zeros((B,), jnp.int32)], axis=1),
    jnp.stack([ctx.token_mask(pos_B), cls_mask_BS], axis=1),
    cache=st.cache,
    slots_BT=jnp.stack([tok_slot_B, jnp.where(judged_B, 0, S)], axis=1),
    cls_row=1,
    lm_rows_BK=jnp.zeros((B, 1), jnp.int32),
  )  # the CLS row's LM logits are never used
  return o.logits_BTV[:, 0], jax.nn.sigmoid(o.cls_logit_B), o.cache


def _step(ctx: _Context, st: _State, with_cls: bool) -> _State:
  """One loop step; `with_cls` (static) adds the CLS row for the rows that want it."""
  dcfg, S = ctx.dcfg, ctx.S
  active_B = ~st.rows.done_B
  pos_B = st.rows.length_B
  tok_slot_B = jnp.where(active_B, pos_B, S)
  judged_B = jnp.zeros((ctx.B,), bool)
  if with_cls:
    judged_B = wants_cls(st.rows, ctx.visible_start_B, dcfg) & due(st.rows, st.step, dcfg)
  logits_BV, p_B, cache = _forward(ctx, st, _take_B(st.seq_BS, pos_B), pos_B, tok_slot_B, judged_B, with_cls)
  p_B = jnp.where(judged_B, _override(p_B, ctx.p_override_BN, st.step + 1), jnp.nan)
  rows, next_B = transition(
    st.rows,
    st.step,
    judged_B,
    judged_B & (p_B > dcfg.threshold),
    sample_tokens(logits_BV, ctx.sampling, st.step + 1),
    ctx.refusal_R,
    ctx.eos,
    ctx.inputs.input_len_B,
    dcfg,
  )
  logits_BNV = st.logits_BNV
  if logits_BNV is not None:
    logits_BNV = logits_BNV.at[:, st.step + 1].set(logits_BV)
  new = _State(
    step=st.step + 1,
    cache=cache,
    seq_BS=_put_B(st.seq_BS, jnp.where(active_B, rows.length_B, S), next_B),
    rows=rows,
    trace_BN=st.trace_BN.at[:, st.step].set(p_B),
    fed_pos_BN=st.fed_pos_BN.at[:, st.step].set(jnp.where(active_B, pos_B, -1)),
    logits_BNV=logits_BNV,
  )
  _report(ctx, new, p_B)
  return new


def _run(ctx: _Context, state: _State) -> _State:
  """The loop over `_step` until `running` says stop."""
  go_on = functools.partial(running, max_steps=ctx.dcfg.max_steps)
  if ctx.dcfg.schedule == "first":
    return jax.lax.while_loop(go_on, lambda s: _step(ctx, s, with_cls=False), state)
  # Nested loops instead of lax.cond: XLA copies the whole KV cache into a conditional on
  # every step, while loops update it in place. The inner loop runs one-row steps until a
  # step needs the CLS row, so every outer iteration starts with a two-row step (step 0 is
  # on every schedule but `first`).
  wants_now = lambda s: jnp.any(due(s.rows, s.step, ctx.dcfg) & wants_cls(s.rows, ctx.visible_start_B, ctx.dcfg))
  token_steps = lambda st: jax.lax.while_loop(
    lambda s: go_on(s) & ~wants_now(s), lambda s: _step(ctx, s, with_cls=False), st
  )
  return jax.lax.while_loop(go_on, lambda s: token_steps(_step(ctx, s, with_cls=True)), state)


def _decode_impl(
  params,
  inputs: DecodeInputs,
  refusal_R: Array,
  sampling: Sampling,
  p_override_BN: Array | None,
  eos: Array,
  stream_id: Array,
  cfg: ModelConfig,
  dcfg: DecodeConfig,
  return_logits: bool,
  stream: bool,
) -> DecodeOutput:
  B, P = inputs.tokens_BP.shape
  ctx = _Context(
    model=Transformer(cfg),
    params=params,
    cfg=cfg,
    dcfg=dcfg,
    inputs=inputs,
    refusal_R=refusal_R,
    sampling=sampling,
    p_override_BN=p_override_BN,
    eos=eos,
    S=P + dcfg.max_new_tokens,
    # docs/method.md decision 6: an attacker prefill counts as response by default.
    visible_start_B=inputs.prompt_len_B if dcfg.prefill_visible else inputs.input_len_B,
    stream_id=stream_id if stream else None,
  )
  state, p0_B, malicious0_B, last_logits_BV = _prefill(ctx)
  if return_logits:
    N = dcfg.max_steps
    state = state._replace(logits_BNV=jnp.zeros((B, N + 1, cfg.vocab_size), jnp.float32).at[:, 0].set(last_logits_BV))
  _report(ctx, state, p0_B)
  final = _run(ctx, state)
  rows = final.rows
  confirmed_B = rows.mode_B == CONFIRMED
  return DecodeOutput(
    tokens_BS=final.seq_BS,
    prompt_len_B=inputs.prompt_len_B,
    end_B=rows.length_B + 1,
    p_initial_B=p0_B,
    initial_malicious_B=malicious0_B,
    cls_trace_BN=final.trace_BN,
    fed_pos_BN=final.fed_pos_BN,
    trigger_step_B=jnp.where(confirmed_B, rows.trigger_step_B, -1),
    trigger_pos_B=jnp.where(confirmed_B, rows.trigger_pos_B, -1),
    insert_pos_B=rows.insert_pos_B,
    false_alarms_B=rows.false_alarms_B,
    num_steps=final.step,
    logits_BNV=final.logits_BNV,
  )


_decode_jit = jax.jit(_decode_impl, static_argnums=(7, 8, 9, 10))


class RowResult(NamedTuple):
  """One row of a `DecodeOutput` in response coordinates (index 0 = first response token,
  which is the first attacker-prefill token when there is one)."""

  response_ids: list[int]
  prefill_len: int
  p_initial: float
  initial_malicious: bool
  trace: list[tuple[int, int, float]]  # (loop step, response index of the fed token, p) per re-classification
  trigger_step: int  # -1: no confirmed flip
  trigger_index: int  # S_t as a response index; -1 if none
  insert_index: int  # where the refusal prefix starts in response_ids; -1 if none
  false_alarms: int


def row_results(out: DecodeOutput, inputs: DecodeInputs) -> list[RowResult]:
  o = jax.tree.map(np.asarray, out)
  start_B = np.asarray(inputs.prompt_len_B)
  prefill_B = np.asarray(inputs.input_len_B) - start_B
  rel = lambda x, b: int(x - start_B[b]) if x >= 0 else -1
  results = []
  for b in range(start_B.shape[0]):
    steps = np.flatnonzero(~np.isnan(o.cls_trace_BN[b]))
    results.append(
      RowResult(
        response_ids=o.tokens_BS[b, start_B[b] : o.end_B[b]].tolist(),
        prefill_len=int(prefill_B[b]),
        p_initial=float(o.p_initial_B[b]),
        initial_malicious=bool(o.initial_malicious_B[b]),
        trace=[(int(s), rel(o.fed_pos_BN[b, s], b), float(o.cls_trace_BN[b, s])) for s in steps],
        trigger_step=int(o.trigger_step_B[b]),
        trigger_index=rel(o.trigger_pos_B[b], b),
        insert_index=rel(o.insert_pos_B[b], b),
        false_alarms=int(o.false_alarms_B[b]),
      )
    )
  return results


def generate_ids(
  cfg: ModelConfig,
  params,
  prompts: Sequence[Sequence[int]],
  query_spans,
  refusal_ids: Sequence[int],
  dcfg: DecodeConfig = DecodeConfig(),
  sampling: Sampling | None = None,
  prefills=None,
  eos_id: int | None = None,
  pad_to: int | None = None,
) -> list[RowResult]:
  """Token-level convenience around `decode`: packs, runs and unpacks one batch.
  eos_id: the stop token (None: run to max_new_tokens)."""
  inputs = pack_inputs(prompts, query_spans, prefills, pad_to)
  sampling = sampling or Sampling.make(len(prompts))
  out = decode(
    to_layout(params, cfg), inputs, jnp.asarray(refusal_ids, jnp.int32), sampling, cfg=cfg, dcfg=dcfg, eos_id=eos_id
  )
  return row_results(out, inputs)


@functools.lru_cache(maxsize=64)
def _sharded_decode(
  layout: Layout, cfg: ModelConfig, dcfg: DecodeConfig, return_logits: bool, stream: bool, forced: bool
):
  """`_decode_impl` jitted with explicit shardings: params by the layout's rules, every row-shaped
  input and output split over the row shards, scalars and the refusal ids replicated."""
  rows, rep = layout.rows, layout.replicated
  in_shardings = (
    layout.params(abstract_params(cfg)),
    DecodeInputs(rows(2), rows(1), rows(1), rows(2)),
    rep,
    Sampling(rows(1), rows(1), rows(1), rows(1)),
    rows(2) if forced else None,
    rep,
    rep,
  )
  out_shardings = DecodeOutput(
    tokens_BS=rows(2),
    prompt_len_B=rows(1),
    end_B=rows(1),
    p_initial_B=rows(1),
    initial_malicious_B=rows(1),
    cls_trace_BN=rows(2),
    fed_pos_BN=rows(2),
    trigger_step_B=rows(1),
    trigger_pos_B=rows(1),
    insert_pos_B=rows(1),
    false_alarms_B=rows(1),
    num_steps=rep,
    logits_BNV=rows(3) if return_logits else None,
  )
  impl = functools.partial(_decode_impl, cfg=cfg, dcfg=dcfg, return_logits=return_logits, stream=stream)
  return jax.jit(impl, in_shardings=in_shardings, out_shardings=out_shardings)
