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

Per-row state machine (method.md §3): the prompt-time judgment picks Rule 1 (malicious: the
refusal prefix is forced right after the prompt and any attacker prefill) or Rule 2 (benign).
A benign row whose re-classification crosses the threshold records S_t (the slot of the token
fed at that step) and follows Rule 3; a benign result before τ malicious events is a false
alarm (back to Rule 2); τ of them confirm the flip: the row is cut back to S_t (cache and
tokens), the refusal prefix is teacher-forced from there, and the row stops re-classifying.
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


class _State(NamedTuple):
  step: Array
  cache: tuple
  seq_BS: Array
  length_B: Array  # filled slots; the pending token sits in seq_BS[b, length_B[b]]
  done_B: Array
  mode_B: Array
  trigger_pos_B: Array
  trigger_step_B: Array
  malicious_run_B: Array
  refusal_next_B: Array  # index of the next refusal token to force; R when none is pending
  insert_pos_B: Array
  false_alarms_B: Array
  trace_BN: Array
  fed_pos_BN: Array
  logits_BNV: Array | None


def bucket(length: int, multiple: int = 64) -> int:
  """Prompt lengths are padded up to a multiple of this, so nearby lengths share one compile."""
  return -(-length // multiple) * multiple


def pack_inputs(prompts: Sequence[Sequence[int]], query_spans: Sequence[Sequence[int]],
                prefills: Sequence[Sequence[int]] | None = None, pad_to: int | None = None,
                bucket_multiple: int = 64) -> DecodeInputs:
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
    tokens_BP[b, :len(r)] = r
  return DecodeInputs(jnp.asarray(tokens_BP), jnp.asarray([len(p) for p in prompts], jnp.int32),
                      jnp.asarray([len(r) for r in rows], jnp.int32), jnp.asarray(query_spans, jnp.int32))


def _take_B(x_BN: Array, i_B: Array) -> Array:
  return jnp.take_along_axis(x_BN, i_B[:, None], axis=1)[:, 0]


def _put_B(x_BN: Array, i_B: Array, v_B: Array) -> Array:
  """x[b, i_B[b]] = v_B[b]; an index past the end leaves the row untouched."""
  return x_BN.at[jnp.arange(x_BN.shape[0]), i_B].set(v_B, mode="drop")


def decode(params, inputs: DecodeInputs, refusal_R: Array, sampling: SamplingParams,
           p_override_BN: Array | None = None, *, cfg: ModelConfig, dcfg: DecodeConfig,
           eos_id: int | None, return_logits: bool = False) -> DecodeOutput:
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


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _decode_jit(params, inputs: DecodeInputs, refusal_R: Array, sampling: SamplingParams,
                p_override_BN: Array | None, eos: Array, cfg: ModelConfig, dcfg: DecodeConfig,
                return_logits: bool) -> DecodeOutput:
  model = Transformer(cfg)
  B, P = inputs.tokens_BP.shape
  S = P + dcfg.max_new_tokens
  N = dcfg.max_steps
  R = refusal_R.shape[0]
  window = cfg.sliding_window
  token_mask = functools.partial(masks.decode_token_mask, num_slots=S, sliding_window=window,
                                 response_sees_cls=dcfg.response_sees_cls)
  prompt_len_B, input_len_B, query_span_B2 = inputs.prompt_len_B, inputs.input_len_B, inputs.query_span_B2
  # First response slot the CLS may read under Rules 1–3 (decision 6: prefill counts by default).
  visible_start_B = prompt_len_B if dcfg.prefill_visible else input_len_B

  def override(p_B, column):
    if p_override_BN is None:
      return p_B
    forced_B = p_override_BN[:, column]
    return jnp.where(jnp.isnan(forced_B), p_B, forced_B)

  # Prompt pass: rows in slots 0..P-1, padding dropped; the CLS judges the query only.
  slots_BP = jnp.where(jnp.arange(P)[None, :] < input_len_B[:, None], jnp.arange(P)[None, :], S)
  out = model.apply({"params": params}, inputs.tokens_BP, jnp.broadcast_to(jnp.arange(P), (B, P)),
                    masks.prefill_mask(input_len_B, prompt_len_B, query_span_B2, P, S, window,
                                       response_sees_cls=dcfg.response_sees_cls),
                    cache=init_cache(cfg, B, S), slots_BT=slots_BP, cls_row=0)
  p0_B = override(jax.nn.sigmoid(out.cls_logit_B), 0)
  malicious0_B = p0_B > dcfg.threshold
  last_logits_BV = jnp.take_along_axis(out.logits_BTV, (input_len_B - 1)[:, None, None], axis=1)[:, 0]
  refuse0_B = malicious0_B & dcfg.strategic_decoding
  first_B = jnp.where(refuse0_B, refusal_R[0], sample_tokens(last_logits_BV, sampling, 0))

  seq_BS = jnp.pad(inputs.tokens_BP, ((0, 0), (0, S - P)))
  seq_BS = _put_B(seq_BS, input_len_B, first_B)
  logits_BNV = None
  if return_logits:
    logits_BNV = jnp.zeros((B, N + 1, cfg.vocab_size), jnp.float32).at[:, 0].set(last_logits_BV)
  state = _State(
      step=jnp.int32(0), cache=out.cache, seq_BS=seq_BS, length_B=input_len_B,
      done_B=(~refuse0_B & (first_B == eos)) | (dcfg.max_new_tokens <= 1),
      mode_B=jnp.where(malicious0_B, MALICIOUS, BENIGN).astype(jnp.int32),
      trigger_pos_B=jnp.full((B,), -1, jnp.int32), trigger_step_B=jnp.full((B,), -1, jnp.int32),
      malicious_run_B=jnp.zeros((B,), jnp.int32),
      refusal_next_B=jnp.where(refuse0_B, 1, R).astype(jnp.int32),
      insert_pos_B=jnp.where(refuse0_B, input_len_B, -1),
      false_alarms_B=jnp.zeros((B,), jnp.int32),
      trace_BN=jnp.full((B, N), jnp.nan, jnp.float32), fed_pos_BN=jnp.full((B, N), -1, jnp.int32),
      logits_BNV=logits_BNV)

  def forward_token_only(st: _State, tok_B, pos_B, tok_slot_B):
    o = model.apply({"params": params}, tok_B[:, None], pos_B[:, None],
                    token_mask(pos_B)[:, None], cache=st.cache,
                    slots_BT=tok_slot_B[:, None], cls_row=None)
    return o.logits_BTV[:, 0], jnp.full((B,), jnp.nan, jnp.float32), o.cache

  def forward_with_cls(st: _State, tok_B, pos_B, tok_slot_B, wants_B):
    cls_mask_BS = masks.cls_inference_mask(
        st.mode_B, pos_B, query_span_B2, visible_start_B, st.trigger_pos_B, S, r1=dcfg.r1, r2=dcfg.r2,
        r3=dcfg.r3, rule2_query=dcfg.rule2_include_query, strategic=dcfg.strategic_attention)
    tokens_B2 = jnp.stack([tok_B, jnp.full((B,), cfg.cls_id, jnp.int32)], axis=1)
    positions_B2 = jnp.stack([pos_B, jnp.zeros((B,), jnp.int32)], axis=1)
    slots_B2 = jnp.stack([tok_slot_B, jnp.where(wants_B, 0, S)], axis=1)
    mask_B2S = jnp.stack([token_mask(pos_B), cls_mask_BS], axis=1)
    o = model.apply({"params": params}, tokens_B2, positions_B2, mask_B2S, cache=st.cache,
                    slots_BT=slots_B2, cls_row=1)
    return o.logits_BTV[:, 0], jax.nn.sigmoid(o.cls_logit_B), o.cache

  def wants_cls(st: _State) -> Array:
    """[B] rows whose CLS would change if re-read now."""
    # A Rule-1 window stops growing after r1 response tokens; re-reading it changes nothing.
    rule1_open_B = (st.length_B < visible_start_B + dcfg.r1) | (not dcfg.strategic_attention)
    return ~st.done_B & (st.mode_B != CONFIRMED) & ((st.mode_B != MALICIOUS) | rule1_open_B)

  def due_B(st: _State) -> Array:
    """[B] rows the schedule re-classifies now. Under `annealing` a row in Rule 3 is re-read every
    step until its flip is confirmed or withdrawn: the gaps reach 64 steps, so a flip first seen at
    step 64 or later could otherwise never gather its τ events. (`periodic` keeps its own steps;
    its late flips are what `tau_unit="steps"` is for.)"""
    if dcfg.schedule != "annealing":
      return dcfg.reclassify_at(st.step) & jnp.ones_like(st.done_B)
    return dcfg.reclassify_at(st.step) | (st.mode_B == TRANSITION)

  def step(st: _State, with_cls: bool) -> _State:
    """One loop step; `with_cls` (static) adds the CLS row for the rows that want it."""
    active_B = ~st.done_B
    pos_B = st.length_B
    tok_B = _take_B(st.seq_BS, pos_B)
    tok_slot_B = jnp.where(active_B, pos_B, S)
    if with_cls:
      judged_B = wants_cls(st) & due_B(st)
      logits_BV, p_B, cache = forward_with_cls(st, tok_B, pos_B, tok_slot_B, judged_B)
    else:
      judged_B = jnp.zeros((B,), bool)
      logits_BV, p_B, cache = forward_token_only(st, tok_B, pos_B, tok_slot_B)
    p_B = jnp.where(judged_B, override(p_B, st.step + 1), jnp.nan)
    malicious_B = judged_B & (p_B > dcfg.threshold)

    # Rule 2 → Rule 3 on a flip; Rule 3 counts malicious events or falls back on a benign one.
    was_benign_B = st.mode_B == BENIGN
    was_transition_B = st.mode_B == TRANSITION
    flips_B = was_benign_B & malicious_B
    withdrawn_B = was_transition_B & judged_B & ~malicious_B
    trigger_pos_B = jnp.where(flips_B, pos_B, jnp.where(withdrawn_B, -1, st.trigger_pos_B))
    trigger_step_B = jnp.where(flips_B, st.step, jnp.where(withdrawn_B, -1, st.trigger_step_B))
    run_B = jnp.where(flips_B, 1, jnp.where(was_transition_B & malicious_B, st.malicious_run_B + 1,
                                            jnp.where(withdrawn_B, 0, st.malicious_run_B)))
    mode_B = jnp.where(flips_B, TRANSITION, jnp.where(withdrawn_B, BENIGN, st.mode_B))
    if dcfg.tau_unit == "events":
      held_B = run_B >= dcfg.tau
    else:
      held_B = st.step - trigger_step_B + 1 >= dcfg.tau
    confirmed_B = (flips_B | (was_transition_B & malicious_B)) & held_B
    mode_B = jnp.where(confirmed_B, CONFIRMED, mode_B)

    # Next pending token: rollback + first refusal token, a forced refusal token, or a sample.
    rollback_B = confirmed_B & dcfg.strategic_decoding
    cut_len_B = trigger_pos_B + int(dcfg.keep_trigger_token)
    forcing_B = st.refusal_next_B < R
    forced_B = refusal_R[jnp.minimum(st.refusal_next_B, R - 1)]
    sampled_B = sample_tokens(logits_BV, sampling, st.step + 1)
    next_B = jnp.where(rollback_B, refusal_R[0], jnp.where(forcing_B, forced_B, sampled_B))
    refusal_next_B = jnp.where(rollback_B, 1, jnp.where(forcing_B, st.refusal_next_B + 1, st.refusal_next_B))
    length_B = jnp.where(active_B, jnp.where(rollback_B, cut_len_B, pos_B + 1), st.length_B)
    ends_B = (~rollback_B & ~forcing_B & (next_B == eos)) | (length_B + 1 - input_len_B >= dcfg.max_new_tokens)

    logits_BNV = st.logits_BNV
    if logits_BNV is not None:
      logits_BNV = logits_BNV.at[:, st.step + 1].set(logits_BV)
    return _State(
        step=st.step + 1, cache=cache,
        seq_BS=_put_B(st.seq_BS, jnp.where(active_B, length_B, S), next_B),
        length_B=length_B, done_B=st.done_B | (active_B & ends_B),
        mode_B=jnp.where(active_B, mode_B, st.mode_B),
        trigger_pos_B=trigger_pos_B, trigger_step_B=trigger_step_B, malicious_run_B=run_B,
        refusal_next_B=jnp.where(active_B, refusal_next_B, st.refusal_next_B),
        insert_pos_B=jnp.where(rollback_B, cut_len_B, st.insert_pos_B),
        false_alarms_B=st.false_alarms_B + withdrawn_B.astype(jnp.int32),
        trace_BN=st.trace_BN.at[:, st.step].set(p_B),
        fed_pos_BN=st.fed_pos_BN.at[:, st.step].set(jnp.where(active_B, pos_B, -1)),
        logits_BNV=logits_BNV)

  running = lambda st: (st.step < N) & ~jnp.all(st.done_B)
  token_steps = lambda st: jax.lax.while_loop(
      lambda s: running(s) & ~jnp.any(due_B(s) & wants_cls(s)),
      lambda s: step(s, with_cls=False), st)
  if dcfg.schedule == "first":
    final = jax.lax.while_loop(running, lambda s: step(s, with_cls=False), state)
  else:
    # Nested loops instead of lax.cond: XLA copies the whole KV cache into a conditional on
    # every step, while loops update it in place. The inner loop runs one-row steps until a
    # step needs the CLS row, so every outer iteration starts with a two-row step (step 0 is
    # on every schedule but `first`).
    final = jax.lax.while_loop(running, lambda s: token_steps(step(s, with_cls=True)), state)
  confirmed_B = final.mode_B == CONFIRMED
  return DecodeOutput(
      tokens_BS=final.seq_BS, prompt_len_B=prompt_len_B, end_B=final.length_B + 1,
      p_initial_B=p0_B, initial_malicious_B=malicious0_B, cls_trace_BN=final.trace_BN,
      fed_pos_BN=final.fed_pos_BN, trigger_step_B=jnp.where(confirmed_B, final.trigger_step_B, -1),
      trigger_pos_B=jnp.where(confirmed_B, final.trigger_pos_B, -1), insert_pos_B=final.insert_pos_B,
      false_alarms_B=final.false_alarms_B, num_steps=final.step, logits_BNV=final.logits_BNV)


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
    results.append(RowResult(
        response_ids=o.tokens_BS[b, start_B[b]:o.end_B[b]].tolist(), prefill_len=int(prefill_B[b]),
        p_initial=float(o.p_initial_B[b]), initial_malicious=bool(o.initial_malicious_B[b]),
        trace=[(int(s), rel(o.fed_pos_BN[b, s], b), float(o.cls_trace_BN[b, s])) for s in steps],
        trigger_step=int(o.trigger_step_B[b]), trigger_index=rel(o.trigger_pos_B[b], b),
        insert_index=rel(o.insert_pos_B[b], b), false_alarms=int(o.false_alarms_B[b])))
  return results


def generate_ids(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], query_spans,
                 refusal_ids: Sequence[int], dcfg: DecodeConfig = DecodeConfig(),
                 sampling: SamplingParams | None = None, prefills=None, eos_id: int | None = None,
                 pad_to: int | None = None) -> list[RowResult]:
  """Token-level convenience around `decode`: packs, runs and unpacks one batch.
  eos_id: the stop token (None: run to max_new_tokens)."""
  inputs = pack_inputs(prompts, query_spans, prefills, pad_to)
  sampling = sampling or SamplingParams.make(len(prompts))
  out = decode(to_layout(params, cfg), inputs, jnp.asarray(refusal_ids, jnp.int32), sampling,
               cfg=cfg, dcfg=dcfg, eos_id=eos_id)
  return row_results(out, inputs)
