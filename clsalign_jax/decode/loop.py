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
is the stop condition; `_State` is the loop carry, and `_decode_jit` wires the model into it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clsalign_jax import masks
from clsalign_jax.decode.config import DecodeConfig
from clsalign_jax.decode.sampling import SamplingParams, sample_tokens
from clsalign_jax.model import ModelConfig, Transformer, init_cache, to_layout

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
  return jnp.take_along_axis(x_BN, i_B[:, None], axis=1)[:, 0]


def _put_B(x_BN: Array, i_B: Array, v_B: Array) -> Array:
  """x[b, i_B[b]] = v_B[b]; an index past the end leaves the row untouched."""
  return x_BN.at[jnp.arange(x_BN.shape[0]), i_B].set(v_B, mode="drop")


def decode(
  params,
  inputs: DecodeInputs,
  refusal_R: Array,
  sampling: SamplingParams,
  p_override_BN: Array | None = None,
  *,
  cfg: ModelConfig,
  dcfg: DecodeConfig,
  eos_id: int | None,
  return_logits: bool = False,
) -> DecodeOutput:
  """Generate for a batch of packed prompts: one compiled program per shape bucket and set of
  static options, however the arguments are passed.

  params: in the layout of `cfg` (see `model.to_layout`). refusal_R: the refusal-prefix ids
  (R >= 1). eos_id: None never stops early (benchmarks). p_override_BN ([B, max_steps + 1],
  NaN = use the model): replaces p(malicious) at the prompt (column 0) and at loop step s
  (column s + 1), to drive the state machine in tests and experiments; the CLS K/V written
  to the cache are still the model's.
  """
  # EOS is traced (-1 never matches), so changing it does not recompile.
  eos = jnp.int32(-1 if eos_id is None else eos_id)
  return _decode_jit(params, inputs, refusal_R, sampling, p_override_BN, eos, cfg, dcfg, return_logits)


def _override(p_B: Array, p_override_BN: Array | None, column) -> Array:
  """p(malicious) with the forced values of `column` where they are not NaN."""
  if p_override_BN is None:
    return p_B
  forced_B = p_override_BN[:, column]
  return jnp.where(jnp.isnan(forced_B), p_B, forced_B)


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _decode_jit(
  params,
  inputs: DecodeInputs,
  refusal_R: Array,
  sampling: SamplingParams,
  p_override_BN: Array | None,
  eos: Array,
  cfg: ModelConfig,
  dcfg: DecodeConfig,
  return_logits: bool,
) -> DecodeOutput:
  model = Transformer(cfg)
  B, P = inputs.tokens_BP.shape
  S = P + dcfg.max_new_tokens
  N = dcfg.max_steps
  R = refusal_R.shape[0]
  window = cfg.sliding_window
  token_mask = functools.partial(
    masks.decode_token_mask, num_slots=S, sliding_window=window, response_sees_cls=dcfg.response_sees_cls
  )
  prompt_len_B, input_len_B, query_span_B2 = inputs.prompt_len_B, inputs.input_len_B, inputs.query_span_B2
  # First response slot the CLS may read under Rules 1–3 (docs/method.md decision 6: prefill counts by default).
  visible_start_B = prompt_len_B if dcfg.prefill_visible else input_len_B

  # Prompt pass: rows in slots 0..P-1, padding dropped; the CLS judges the query only, and only
  # the last input row needs LM logits.
  slots_BP = jnp.where(jnp.arange(P)[None, :] < input_len_B[:, None], jnp.arange(P)[None, :], S)
  out = model.apply(
    {"params": params},
    inputs.tokens_BP,
    jnp.broadcast_to(jnp.arange(P), (B, P)),
    masks.prefill_mask(
      input_len_B, prompt_len_B, query_span_B2, P, S, window, response_sees_cls=dcfg.response_sees_cls
    ),
    cache=init_cache(cfg, B, S),
    slots_BT=slots_BP,
    cls_row=0,
    lm_rows_BK=(input_len_B - 1)[:, None],
  )
  p0_B = _override(jax.nn.sigmoid(out.cls_logit_B), p_override_BN, 0)
  malicious0_B = p0_B > dcfg.threshold
  last_logits_BV = out.logits_BTV[:, 0]
  refuse0_B = malicious0_B & dcfg.strategic_decoding
  first_B = jnp.where(refuse0_B, refusal_R[0], sample_tokens(last_logits_BV, sampling, 0))

  logits_BNV = None
  if return_logits:
    logits_BNV = jnp.zeros((B, N + 1, cfg.vocab_size), jnp.float32).at[:, 0].set(last_logits_BV)
  state = _State(
    step=jnp.int32(0),
    cache=out.cache,
    seq_BS=_put_B(jnp.pad(inputs.tokens_BP, ((0, 0), (0, S - P))), input_len_B, first_B),
    rows=RowState(
      length_B=input_len_B,
      # A one-token refusal prefix forced at the prompt is already complete: the row ends on it.
      done_B=(~refuse0_B & (first_B == eos))
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
    logits_BNV=logits_BNV,
  )

  def forward(st: _State, tok_B, pos_B, tok_slot_B, judged_B, with_cls: bool):
    """LM logits of the fed tokens, p(malicious) (NaN without the CLS row) and the new cache."""
    if not with_cls:
      o = model.apply(
        {"params": params},
        tok_B[:, None],
        pos_B[:, None],
        token_mask(pos_B)[:, None],
        cache=st.cache,
        slots_BT=tok_slot_B[:, None],
        cls_row=None,
      )
      return o.logits_BTV[:, 0], jnp.full((B,), jnp.nan, jnp.float32), o.cache
    cls_mask_BS = masks.cls_inference_mask(
      st.rows.mode_B,
      pos_B,
      query_span_B2,
      visible_start_B,
      st.rows.trigger_pos_B,
      S,
      r1=dcfg.r1,
      r2=dcfg.r2,
      r3=dcfg.r3,
      rule2_query=dcfg.rule2_include_query,
      strategic=dcfg.strategic_attention,
    )
    o = model.apply(
      {"params": params},
      jnp.stack([tok_B, jnp.full((B,), cfg.cls_id, jnp.int32)], axis=1),
      jnp.stack([pos_B, jnp.zeros((B,), jnp.int32)], axis=1),
      jnp.stack([token_mask(pos_B), cls_mask_BS], axis=1),
      cache=st.cache,
      slots_BT=jnp.stack([tok_slot_B, jnp.where(judged_B, 0, S)], axis=1),
      cls_row=1,
      lm_rows_BK=jnp.zeros((B, 1), jnp.int32),
    )  # the CLS row's LM logits are never used
    return o.logits_BTV[:, 0], jax.nn.sigmoid(o.cls_logit_B), o.cache

  def step(st: _State, with_cls: bool) -> _State:
    """One loop step; `with_cls` (static) adds the CLS row for the rows that want it."""
    active_B = ~st.rows.done_B
    pos_B = st.rows.length_B
    tok_slot_B = jnp.where(active_B, pos_B, S)
    judged_B = jnp.zeros((B,), bool)
    if with_cls:
      judged_B = wants_cls(st.rows, visible_start_B, dcfg) & due(st.rows, st.step, dcfg)
    logits_BV, p_B, cache = forward(st, _take_B(st.seq_BS, pos_B), pos_B, tok_slot_B, judged_B, with_cls)
    p_B = jnp.where(judged_B, _override(p_B, p_override_BN, st.step + 1), jnp.nan)
    rows, next_B = transition(
      st.rows,
      st.step,
      judged_B,
      judged_B & (p_B > dcfg.threshold),
      sample_tokens(logits_BV, sampling, st.step + 1),
      refusal_R,
      eos,
      input_len_B,
      dcfg,
    )
    logits_BNV = st.logits_BNV
    if logits_BNV is not None:
      logits_BNV = logits_BNV.at[:, st.step + 1].set(logits_BV)
    return _State(
      step=st.step + 1,
      cache=cache,
      seq_BS=_put_B(st.seq_BS, jnp.where(active_B, rows.length_B, S), next_B),
      rows=rows,
      trace_BN=st.trace_BN.at[:, st.step].set(p_B),
      fed_pos_BN=st.fed_pos_BN.at[:, st.step].set(jnp.where(active_B, pos_B, -1)),
      logits_BNV=logits_BNV,
    )

  go_on = functools.partial(running, max_steps=N)
  if dcfg.schedule == "first":
    final = jax.lax.while_loop(go_on, lambda s: step(s, with_cls=False), state)
  else:
    # Nested loops instead of lax.cond: XLA copies the whole KV cache into a conditional on
    # every step, while loops update it in place. The inner loop runs one-row steps until a
    # step needs the CLS row, so every outer iteration starts with a two-row step (step 0 is
    # on every schedule but `first`).
    token_steps = lambda st: jax.lax.while_loop(
      lambda s: go_on(s) & ~jnp.any(due(s.rows, s.step, dcfg) & wants_cls(s.rows, visible_start_B, dcfg)),
      lambda s: step(s, with_cls=False),
      st,
    )
    final = jax.lax.while_loop(go_on, lambda s: token_steps(step(s, with_cls=True)), state)
  rows = final.rows
  confirmed_B = rows.mode_B == CONFIRMED
  return DecodeOutput(
    tokens_BS=final.seq_BS,
    prompt_len_B=prompt_len_B,
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
  sampling: SamplingParams | None = None,
  prefills=None,
  eos_id: int | None = None,
  pad_to: int | None = None,
) -> list[RowResult]:
  """Token-level convenience around `decode`: packs, runs and unpacks one batch.
  eos_id: the stop token (None: run to max_new_tokens)."""
  inputs = pack_inputs(prompts, query_spans, prefills, pad_to)
  sampling = sampling or SamplingParams.make(len(prompts))
  out = decode(
    to_layout(params, cfg), inputs, jnp.asarray(refusal_ids, jnp.int32), sampling, cfg=cfg, dcfg=dcfg, eos_id=eos_id
  )
  return row_results(out, inputs)
