"""The jitted decode loop: cache vs full recomputation, row independence, the strategic-decoding
state machine (driven by forced classifier outputs), schedules and compile reuse.

Every decode compile costs ~4 s on 2 cores, so the tests share a few static configs and one
batch shape (3 rows, padded to 16, always with an override matrix) wherever they can.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clsalign_jax import masks
from clsalign_jax import model as M
from clsalign_jax.decode import DecodeConfig, Sampling, decode, pack_inputs, row_results
from clsalign_jax.decode import loop
from clsalign_jax.decode.loop import _decode_jit
from clsalign_jax.interop.hf import save_hf

CFG = M.ModelConfig(
  vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, bos_id=1, eos_id=2
)
CLS = CFG.cls_id
REFUSAL = [40, 41, 42]
BASE = DecodeConfig(max_new_tokens=12, r2=4, tau=3)
FIRST = BASE.replace(schedule="first")
PERIODIC = BASE.replace(schedule="periodic", period=3)
ANNEALING = BASE.replace(schedule="annealing", anneal_cutoff=6)
PROMPTS = [[CLS, 1, 5, 6, 7, 8, 9, 10], [CLS, 1, 11, 12, 13], [CLS, 1, 14, 15, 16, 17, 18, 19, 20, 21]]
# Query = everything after BOS except the last token (a one-token template tail).
SPANS = [[2, len(p) - 1] for p in PROMPTS]
REF_ROWS, REF_BATCH = 40, 12  # reference passes are padded to one shape: one compile


def _params(seed=0, head_scale=1.0, head_bias=0.0):
  """Random params drawn with numpy: initialising through JAX compiles every random op."""
  rng = np.random.default_rng(seed)
  shapes, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(M.abstract_params(CFG)))
  params = jax.tree.unflatten(
    treedef,
    [
      np.ones(x.shape, np.float32)
      if jax.tree_util.keystr(path).endswith("['weight']")  # norm scales
      else rng.normal(0.0, 0.02, x.shape).astype(np.float32)
      for path, x in shapes
    ],
  )
  # A sharper head keeps p(malicious) away from 0.5, so batch-size rounding cannot flip a decision.
  params["cls_head"]["kernel"] = params["cls_head"]["kernel"] * head_scale
  params["cls_head"]["bias"] = np.full((1,), head_bias, np.float32)
  return params


@jax.jit
def _forward(params, tokens_BT, positions_BT, mask_BTT):
  """No-cache reference pass: LM logits of every row, p(malicious) read from row 0."""
  out = M.Transformer(CFG).apply({"params": params}, tokens_BT, positions_BT, mask_BTT, cls_row=0)
  return out.logits_BTV, jax.nn.sigmoid(out.cls_logit_B)


def _reference(params, passes):
  """Runs [(tokens, positions, mask), ...] through `_forward`, padded to one shape."""
  tokens = np.zeros((REF_BATCH, REF_ROWS), np.int32)
  positions = np.zeros((REF_BATCH, REF_ROWS), np.int32)
  mask = np.tile(np.eye(REF_ROWS, dtype=bool), (REF_BATCH, 1, 1))
  for k, (t, p, m) in enumerate(passes):
    tokens[k, : len(t)], positions[k, : len(t)], mask[k, : len(t), : len(t)] = t, p, m
  logits, p = _forward(params, tokens, positions, mask)
  return np.asarray(logits), np.asarray(p)


def _run(params, prompts, dcfg, override=None, prefills=None, sampling=None, eos_id=None, spans=None, refusal=REFUSAL):
  B = len(prompts)
  inputs = pack_inputs(prompts, spans or [[2, len(p) - 1] for p in prompts], prefills, pad_to=16)
  override = np.full((B, dcfg.max_steps + 1), np.nan, np.float32) if override is None else override
  out = decode(
    params,
    inputs,
    jnp.asarray(refusal, jnp.int32),
    sampling or Sampling.make(B),
    jnp.asarray(override, jnp.float32),
    cfg=CFG,
    dcfg=dcfg,
    eos_id=eos_id,
    return_logits=True,
  )
  return out, inputs


def _override(batch, dcfg, malicious_at=(), prompt=0.0):
  """[B, max_steps + 1] forced p: column 0 = prompt, column s + 1 = loop step s."""
  p = np.zeros((batch, dcfg.max_steps + 1), np.float32)
  p[:, 0] = prompt
  for s in malicious_at:
    p[:, s + 1] = 1.0
  return p


def test_cached_decoding_matches_full_recomputation_without_cls_row():
  params = _params()
  out, inputs = _run(params, PROMPTS, FIRST, override=_override(3, FIRST))
  rows = row_results(out, inputs)
  passes = []
  for b, row in enumerate(rows):
    seq = PROMPTS[b] + row.response_ids
    I = len(PROMPTS[b])
    mask = masks.cls_training_mask(
      np.ones((1, len(seq)), np.int32), np.asarray([SPANS[b]]), np.asarray([[I, len(seq)]])
    )[0]
    passes.append((seq, np.arange(len(seq)), mask))
  ref_logits, _ = _reference(params, passes)
  for b, row in enumerate(rows):
    I, n = len(PROMPTS[b]), len(row.response_ids)
    np.testing.assert_allclose(out.logits_BNV[b, :n], ref_logits[b, I - 1 : I - 1 + n], atol=2e-5, rtol=2e-5)
    assert row.response_ids == ref_logits[b, I - 1 : I - 1 + n].argmax(-1).tolist()


def test_decoding_without_response_sees_cls_is_the_plain_transformers_model(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  params = _params(seed=2)
  # A CLS row far from the mean embedding, so reading it changes what the model says.
  params["cls_embedding"] = np.random.default_rng(3).normal(0.0, 1.0, CFG.d_model).astype(np.float32)
  save_hf(str(tmp_path), CFG, params)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  hf_model.generation_config.eos_token_id = None  # as eos_id=None below: always max_new_tokens
  n = FIRST.max_new_tokens
  rows = row_results(*_run(params, PROMPTS, FIRST.replace(strategic_decoding=False, response_sees_cls=False)))
  for prompt, row in zip(PROMPTS, rows):
    with torch.no_grad():  # the plain model's prompt has no CLS
      ref = hf_model.generate(torch.tensor([prompt[1:]]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert row.response_ids == ref[0, len(prompt) - 1 :].tolist()
  # With the CLS slot visible (the default), the same weights generate something else.
  visible = row_results(*_run(params, PROMPTS, FIRST, override=_override(3, FIRST)))
  assert [r.response_ids for r in visible] != [r.response_ids for r in rows]


def _expanded_reference(prompt, span, response, cls_steps, r2):
  """No-cache recomputation of a decode that re-classifies (Rule 2) at `cls_steps`.

  Every re-classification becomes its own CLS row (position 0) next to the token fed at that
  step; a token row reads the CLS copy that held slot 0 when it was fed (the stale-K/V rule),
  a CLS copy reads itself and the Rule-2 window. Attention is equivariant under a joint
  permutation of rows and keys (positions are explicit), so each CLS copy is also moved to row 0
  in a pass of its own to read its p. Returns the passes and the row of each chosen token.
  """
  I = len(prompt)
  tokens, positions, kinds = list(prompt), list(range(I)), ["prompt"] * I
  for s, tok in enumerate(response[:-1]):
    tokens.append(tok), positions.append(I + s), kinds.append(("tok", s))
    if s in cls_steps:
      tokens.append(CLS), positions.append(0), kinds.append(("cls", s))
  T = len(tokens)
  mask = np.zeros((T, T), bool)
  mask[:I, :I] = np.asarray(masks.prefill_mask(np.asarray([I]), np.asarray([I]), np.asarray([span]), I, I))[0]
  row_of = {k: i for i, k in enumerate(kinds) if k != "prompt"}
  current_cls = 0
  for i, kind in enumerate(kinds[I:], start=I):
    what, s = kind
    if what == "tok":
      current_cls = row_of.get(("cls", s), current_cls)
      mask[i, 1:I] = True
      mask[i, [row_of[("tok", j)] for j in range(s + 1)] + [current_cls]] = True
    else:
      mask[i, [i] + [row_of[("tok", j)] for j in range(max(0, s - r2 + 1), s + 1)]] = True
  passes = [(tokens, positions, mask)]
  for s in sorted(cls_steps):
    perm = np.asarray([row_of[("cls", s)]] + [j for j in range(T) if j != row_of[("cls", s)]])
    passes.append((np.asarray(tokens)[perm], np.asarray(positions)[perm], mask[np.ix_(perm, perm)]))
  chosen_rows = [I - 1] + [row_of[("tok", s)] for s in range(len(response) - 1)]
  return passes, chosen_rows


@pytest.mark.parametrize("dcfg", [BASE, PERIODIC], ids=["each", "periodic"])
def test_cached_decoding_matches_full_recomputation_with_cls_row(dcfg):
  # A negative bias keeps p(malicious) informative but below 0.5: rows stay on Rule 2.
  params = _params(head_scale=5.0, head_bias=-6.0)
  out, inputs = _run(params, PROMPTS, dcfg)
  for b, row in enumerate(row_results(out, inputs)):
    steps = [s for s, *_ in row.trace]
    passes, chosen_rows = _expanded_reference(PROMPTS[b], SPANS[b], row.response_ids, set(steps), dcfg.r2)
    ref_logits, ref_p = _reference(params, passes)
    np.testing.assert_allclose(out.logits_BNV[b, :12], ref_logits[0, chosen_rows], atol=2e-5, rtol=2e-5)
    assert row.response_ids == ref_logits[0, chosen_rows].argmax(-1).tolist()
    got_p = [p for *_, p in row.trace]
    assert max(got_p) < 0.5 and np.ptp(got_p) > 1e-2 * min(got_p)  # below threshold, yet varying
    np.testing.assert_allclose(got_p, ref_p[1 : 1 + len(steps)], rtol=1e-4)
    np.testing.assert_allclose(row.p_initial, ref_p[0], rtol=1e-4)


def test_rows_do_not_depend_on_the_rest_of_the_batch():
  params = _params(head_scale=30.0)
  sampling = Sampling.make(3, temperature=[0.0, 0.8, 1.2], top_k=[0, 20, 0], top_p=[1.0, 1.0, 0.9], seed=[3, 4, 5])
  batch_rows = row_results(*_run(params, PROMPTS, BASE, sampling=sampling))
  assert any(r.trace for r in batch_rows)
  for b, prompt in enumerate(PROMPTS):
    one = jax.tree.map(lambda x: x[b : b + 1], sampling)
    (alone,) = row_results(*_run(params, [prompt], BASE, sampling=one))
    assert alone.response_ids == batch_rows[b].response_ids
    assert (alone.insert_index, alone.trigger_step) == (batch_rows[b].insert_index, batch_rows[b].trigger_step)
    np.testing.assert_allclose([p for *_, p in alone.trace], [p for *_, p in batch_rows[b].trace], atol=1e-5)


def _chain_params():
  """A model whose attention adds nothing (o_proj = 0): the greedy next token is a fixed function
  of the current token, so expected sequences can be written down by hand."""
  params = _params(seed=1)
  for i in range(CFG.n_layers):
    params[f"layers_{i}"]["attn"]["o_proj"] = np.zeros_like(params[f"layers_{i}"]["attn"]["o_proj"])
  vocab = np.arange(CFG.vocab_size)
  passes = [
    (chunk, np.zeros(len(chunk)), np.eye(len(chunk), dtype=bool))
    for chunk in np.array_split(vocab, -(-CFG.vocab_size // REF_ROWS))
  ]
  logits, _ = _reference(params, passes)
  nxt = np.concatenate([logits[k, : len(t)].argmax(-1) for k, (t, _, _) in enumerate(passes)]).tolist()

  def chain(start, n):
    seq = []
    for _ in range(n):
      start = nxt[start]
      seq.append(start)
    return seq

  return params, chain


def test_state_machine_reproduces_hand_computed_sequences():
  params, chain = _chain_params()
  r0, r1, r2 = REFUSAL
  prompt = PROMPTS[0]
  t = chain(prompt[-1], 12)  # the benign continuation t0, t1, ...
  override = np.concatenate(
    [
      _override(1, BASE, prompt=1.0),  # initially malicious, after an attacker prefill
      _override(1, BASE, malicious_at=(3, 4, 5)),  # flip at step 3 confirmed at step 5
      _override(1, BASE, malicious_at=(3, 4, 7, 8, 9)),  # false alarm at step 5, then a confirmed flip
    ]
  )
  rows = row_results(*_run(params, [prompt] * 3, BASE, override=override, prefills=[[50, 51], [], []]))

  assert rows[0].response_ids == [50, 51, r0, r1, r2] + chain(r2, 9)
  assert (rows[0].initial_malicious, rows[0].prefill_len, rows[0].insert_index) == (True, 2, 2)
  # Rule 1 re-reads its window only while it grows (the first r1 = 10 response tokens).
  assert [i for _, i, _ in rows[0].trace] == list(range(2, 10))

  assert rows[1].response_ids == t[:3] + [r0, r1, r2] + chain(r2, 6)
  assert (rows[1].trigger_step, rows[1].trigger_index, rows[1].insert_index, rows[1].false_alarms) == (3, 3, 3, 0)
  assert [s for s, *_ in rows[1].trace] == [0, 1, 2, 3, 4, 5]  # none after the insertion

  assert rows[2].response_ids == t[:7] + [r0, r1, r2] + chain(r2, 2)
  assert (rows[2].trigger_step, rows[2].trigger_index, rows[2].insert_index, rows[2].false_alarms) == (7, 7, 7, 1)


@pytest.mark.parametrize("variant", ["keep_trigger_token", "tau_in_steps", "no_strategic_decoding"])
def test_state_machine_options(variant):
  params, chain = _chain_params()
  r0, r1, r2 = REFUSAL
  prompt = PROMPTS[0]
  t = chain(prompt[-1], 12)
  run = lambda dcfg, override: row_results(*_run(params, [prompt] * 3, dcfg, override=override))
  if variant == "keep_trigger_token":
    dcfg = BASE.replace(keep_trigger_token=True)
    row = run(dcfg, _override(3, dcfg, malicious_at=(3, 4, 5)))[0]
    assert row.response_ids == t[:4] + [r0, r1, r2] + chain(r2, 5)
    assert (row.trigger_index, row.insert_index) == (3, 4)
  elif variant == "tau_in_steps":
    # Periodic(3) re-classifies at steps 0, 3, 6, 9: malicious at 3 and 6 is 2 events but 4 steps.
    for dcfg, expected in (
      (PERIODIC.replace(tau_unit="steps"), t[:3] + [r0, r1, r2] + chain(r2, 6)),
      (PERIODIC, t[:12]),
    ):
      row = run(dcfg, _override(3, dcfg, malicious_at=(3, 6)))[0]
      assert row.response_ids == expected, dcfg.tau_unit
  else:
    dcfg = BASE.replace(strategic_decoding=False)
    override = np.concatenate([_override(1, dcfg, prompt=1.0), _override(2, dcfg, malicious_at=(3, 4, 5))])
    rows = run(dcfg, override)
    assert rows[0].response_ids == rows[1].response_ids == t
    assert rows[0].insert_index == rows[1].insert_index == -1
    # The flip is still confirmed (the row stops re-classifying), it just changes no tokens.
    assert (rows[1].trigger_step, [s for s, *_ in rows[1].trace]) == (3, [0, 1, 2, 3, 4, 5])


def test_end_after_refusal_ends_rows_on_the_refusal_prefix():
  """Both insertion paths end exactly on the prefix's last token; a row that never refuses, and
  every row with the option off, decode as before."""
  params, chain = _chain_params()
  r0, r1, r2 = REFUSAL
  prompt = PROMPTS[0]
  t = chain(prompt[-1], 12)
  dcfg = BASE.replace(end_after_refusal=True)
  override = np.concatenate(
    [
      _override(1, dcfg, prompt=1.0),  # Rule 1 after an attacker prefill
      _override(1, dcfg, malicious_at=(3, 4, 5)),  # flip at step 3 confirmed at step 5: rollback to 3
      _override(1, dcfg),  # never refuses
    ]
  )
  prefills = [[50, 51], [], []]
  out, inputs = _run(params, [prompt] * 3, dcfg, override=override, prefills=prefills)
  rows = row_results(out, inputs)
  assert rows[0].response_ids == [50, 51, r0, r1, r2]  # the prefill stays
  assert (rows[0].prefill_len, rows[0].insert_index) == (2, 2)
  assert rows[1].response_ids == t[:3] + [r0, r1, r2]
  assert (rows[1].trigger_step, rows[1].trigger_index, rows[1].insert_index) == (3, 3, 3)
  assert rows[2].response_ids == t and rows[2].insert_index == -1
  # The continuation after the prefix is all that changes.
  off = row_results(*_run(params, [prompt] * 3, BASE, override=override, prefills=prefills))
  assert off[0].response_ids == rows[0].response_ids + chain(r2, 9)
  assert off[1].response_ids == rows[1].response_ids + chain(r2, 6)
  assert off[2].response_ids == rows[2].response_ids
  # A one-token prefix forced at the prompt is complete before the first loop step.
  one = row_results(*_run(params, [prompt] * 3, dcfg, override=override, prefills=prefills, refusal=[r0]))
  assert one[0].response_ids == [50, 51, r0] and one[1].response_ids == t[:3] + [r0]


@pytest.mark.parametrize(
  "dcfg,expected",
  [(BASE, set(range(11))), (FIRST, set()), (PERIODIC, {0, 3, 6, 9}), (ANNEALING, {0, 1, 2, 4})],
  ids=["each", "first", "periodic", "annealing"],
)
def test_schedules_reclassify_exactly_at_their_steps(dcfg, expected):
  rows = row_results(*_run(_params(), PROMPTS, dcfg, override=_override(3, dcfg)))
  assert all({s for s, *_ in row.trace} == expected for row in rows)


def test_annealing_confirms_a_late_flip():
  # Annealing re-classifies at 0, 1, 2, 4, ..., 64, 128: a flip first seen at step 64 would
  # have to wait for step 128 (past the budget) for its second event. In Rule 3 it is re-read at
  # every step instead, so τ = 3 malicious steps (64, 65, 66) confirm it.
  params, chain = _chain_params()
  r0, r1, r2 = REFUSAL
  dcfg = DecodeConfig(max_new_tokens=80, r2=4, tau=3, schedule="annealing", anneal_cutoff=256)
  t = chain(PROMPTS[0][-1], 80)
  (row,) = row_results(*_run(params, [PROMPTS[0]], dcfg, override=_override(1, dcfg, malicious_at=range(64, 160))))
  assert [s for s, *_ in row.trace] == [0, 1, 2, 4, 8, 16, 32, 64, 65, 66]
  assert (row.trigger_step, row.trigger_index, row.insert_index) == (64, 64, 64)
  assert row.response_ids == t[:64] + [r0, r1, r2] + chain(r2, 13)
  # A flip withdrawn in Rule 3 goes back to the annealing steps.
  (row,) = row_results(*_run(params, [PROMPTS[0]], dcfg, override=_override(1, dcfg, malicious_at=(64, 65))))
  assert [s for s, *_ in row.trace] == [0, 1, 2, 4, 8, 16, 32, 64, 65, 66]
  assert (row.insert_index, row.false_alarms, row.response_ids) == (-1, 1, t)


def test_eos_stops_a_row_and_the_loop():
  params, chain = _chain_params()
  t = chain(PROMPTS[0][-1], 12)
  k = next(k for k in range(3, 12) if t[k] not in t[:k])  # the first token that does not repeat
  out, inputs = _run(params, [PROMPTS[0]] * 3, FIRST, override=_override(3, FIRST), eos_id=t[k])
  assert row_results(out, inputs)[0].response_ids == t[: k + 1]
  assert int(out.num_steps) == k


# Traces of the decode loop, counted through jax.monitoring's public compile events (the jit cache's
# own size is private API): a trace is a miss of the loop's compilation cache.
_LOOP_TRACES = []
jax.monitoring.register_event_duration_secs_listener(
  lambda event, _secs, **kw: (
    _LOOP_TRACES.append(1)
    if event == "/jax/core/compile/jaxpr_trace_duration" and kw.get("fun_name") == _decode_jit.__name__
    else None
  )
)


def test_same_shapes_do_not_recompile():
  params = _params()
  _run(params, PROMPTS, ANNEALING)
  before = len(_LOOP_TRACES)
  other = [[CLS, 1, 30, 31], [CLS, 1, 32, 33, 34, 35, 36], [CLS, 1, 37, 38, 39, 40]]
  inputs = pack_inputs(other, [[2, len(p) - 1] for p in other])  # lengths 4..7 share the bucket of 64
  sampling = Sampling.make(3, temperature=0.7, top_p=0.9, seed=11)
  decode(params, inputs, jnp.asarray(REFUSAL, jnp.int32), sampling, cfg=CFG, dcfg=ANNEALING, eos_id=None)
  after_first = len(_LOOP_TRACES)
  assert after_first == before + 1  # a new bucket (64, not 16) and no logits output
  decode(
    params,
    pack_inputs(PROMPTS, SPANS),
    jnp.asarray(REFUSAL, jnp.int32),
    Sampling.make(3),
    None,
    cfg=CFG,
    dcfg=ANNEALING,
    eos_id=5,
    return_logits=False,
  )
  assert len(_LOOP_TRACES) == after_first  # other sampling settings and eos: traced values, no new trace


# The state machine alone: `transition` on hand-built arrays, against a scalar re-statement of
# docs/method.md §3 written row by row, with no model and no loop compiled.

_transition = jax.jit(loop.transition, static_argnames="dcfg")
_STATE_FIELDS = loop.RowState._fields


def _reference_transition(row, step, judged, malicious, sampled, refusal, eos, input_len, dcfg):
  """One row, one step, as if/else: returns (new row dict, next token or None when done)."""
  row = dict(row)
  if row["done"]:
    return row, None
  pos = row["length"]
  confirmed = False
  if row["mode"] == loop.BENIGN and malicious:
    row.update(mode=loop.TRANSITION, trigger_pos=pos, trigger_step=step, run=1)
    confirmed = True
  elif row["mode"] == loop.TRANSITION and judged and malicious:
    row["run"] += 1
    confirmed = True
  elif row["mode"] == loop.TRANSITION and judged:  # benign in Rule 3: a false alarm
    row.update(mode=loop.BENIGN, trigger_pos=-1, trigger_step=-1, run=0, false_alarms=row["false_alarms"] + 1)
  if confirmed:
    held = row["run"] if dcfg.tau_unit == "events" else step - row["trigger_step"] + 1
    confirmed = held >= dcfg.tau
    if confirmed:
      row["mode"] = loop.CONFIRMED
  R = len(refusal)
  if confirmed and dcfg.strategic_decoding:
    row.update(length=row["trigger_pos"] + int(dcfg.keep_trigger_token), refusal_next=1)
    row["insert"] = row["length"]
    nxt, free = refusal[0], False
  elif row["refusal_next"] < R:
    nxt, free = refusal[row["refusal_next"]], False
    row.update(length=pos + 1, refusal_next=row["refusal_next"] + 1)
  else:
    nxt, free = sampled, True
    row["length"] = pos + 1
  refusal_complete = not free and row["refusal_next"] == R and dcfg.end_after_refusal
  row["done"] = (free and nxt == eos) or refusal_complete or row["length"] + 1 - input_len >= dcfg.max_new_tokens
  return row, nxt


_NAMES = dict(
  length_B="length",
  done_B="done",
  mode_B="mode",
  trigger_pos_B="trigger_pos",
  trigger_step_B="trigger_step",
  malicious_run_B="run",
  refusal_next_B="refusal_next",
  insert_pos_B="insert",
  false_alarms_B="false_alarms",
)


def _rows_to_state(rows):
  return loop.RowState(
    **{f: jnp.asarray([r[_NAMES[f]] for r in rows], bool if f == "done_B" else jnp.int32) for f in _STATE_FIELDS}
  )


def _state_to_rows(state):
  cols = {f: np.asarray(getattr(state, f)).tolist() for f in _STATE_FIELDS}
  return [{_NAMES[f]: cols[f][b] for f in _STATE_FIELDS} for b in range(len(cols["length_B"]))]


def _fresh_row(length, mode=loop.BENIGN, refusal_next=3):
  return dict(
    length=length,
    done=False,
    mode=mode,
    trigger_pos=-1,
    trigger_step=-1,
    run=0,
    refusal_next=refusal_next,
    insert=-1,
    false_alarms=0,
  )


def test_transition_hand_worked():
  # tau = 3 events. Row 0 flips at step 3 (slot 12), holds at 4 and 5: confirmed at step 5, cut back
  # to slot 12 with the first refusal token pending. Row 1 flips at step 3, is benign at step 4:
  # a false alarm, back to Rule 2. Row 2 is in Rule 1: judgements change nothing.
  r0, r1, r2 = REFUSAL
  dcfg = BASE.replace(max_new_tokens=40)
  rows = [_fresh_row(12), _fresh_row(12), _fresh_row(12, mode=loop.MALICIOUS)]
  state = _rows_to_state(rows)
  refusal, eos, input_len = jnp.asarray(REFUSAL, jnp.int32), jnp.int32(-1), jnp.full((3,), 9, jnp.int32)
  verdicts = {3: [True, True, True], 4: [True, False, True], 5: [True, False, True]}
  sampled = jnp.asarray([70, 71, 72], jnp.int32)
  for step in (3, 4, 5):
    malicious = jnp.asarray(verdicts[step])
    state, next_B = _transition(
      state, jnp.int32(step), jnp.ones(3, bool), malicious, sampled, refusal, eos, input_len, dcfg=dcfg
    )
    if step == 4:
      assert np.asarray(state.mode_B).tolist() == [loop.TRANSITION, loop.BENIGN, loop.MALICIOUS]
      assert np.asarray(state.false_alarms_B).tolist() == [0, 1, 0]
  assert np.asarray(state.mode_B).tolist() == [loop.CONFIRMED, loop.BENIGN, loop.MALICIOUS]
  assert np.asarray(state.length_B).tolist() == [12, 15, 15]  # row 0 cut back to S_t = 12
  assert np.asarray(next_B).tolist() == [r0, 71, 72]
  assert np.asarray(state.refusal_next_B).tolist() == [1, 3, 3]
  assert np.asarray(state.insert_pos_B).tolist() == [12, -1, -1]
  assert (np.asarray(state.trigger_pos_B).tolist(), np.asarray(state.trigger_step_B).tolist()) == (
    [12, -1, -1],
    [3, -1, -1],
  )
  # The next steps force r1, r2, then sampling resumes.
  for expected in (r1, r2, 70):
    state, next_B = _transition(
      state, jnp.int32(6), jnp.zeros(3, bool), jnp.zeros(3, bool), sampled, refusal, eos, input_len, dcfg=dcfg
    )
    assert int(next_B[0]) == expected
  assert int(state.length_B[0]) == 15


@pytest.mark.parametrize(
  "dcfg",
  [
    BASE,
    BASE.replace(tau=1),
    BASE.replace(keep_trigger_token=True),
    BASE.replace(strategic_decoding=False),
    PERIODIC.replace(tau_unit="steps", tau=4),
    BASE.replace(end_after_refusal=True),
    BASE.replace(end_after_refusal=True, keep_trigger_token=True, tau=1),
  ],
  ids=["tau3", "tau1", "keep_trigger", "no_decoding", "tau_steps", "end_after_refusal", "end_after_refusal_tau1"],
)
def test_transition_matches_a_row_by_row_reference(dcfg):
  """Random judgement streams on 16 rows (some initially malicious, some ending on EOS or the
  budget) for 30 steps: every field and every pending token agree with the scalar reference."""
  rng = np.random.default_rng(0)
  B, steps = 16, 30
  dcfg = dcfg.replace(max_new_tokens=20)
  input_len = rng.integers(5, 9, B)
  rows = [
    _fresh_row(int(n), mode=loop.MALICIOUS if b % 5 == 0 else loop.BENIGN, refusal_next=1 if b % 5 == 0 else 3)
    for b, n in enumerate(input_len)
  ]
  state = _rows_to_state(rows)
  args = (jnp.asarray(REFUSAL, jnp.int32), jnp.int32(7), jnp.asarray(input_len, jnp.int32))
  seen_modes = set()
  for step in range(steps):
    judged = (rng.random(B) < 0.7) & ~np.asarray(state.done_B)  # the loop never judges a done row
    malicious = judged & (rng.random(B) < 0.45)
    sampled = rng.integers(3, 60, B)
    sampled[rng.random(B) < 0.03] = 7  # EOS now and then
    state, next_B = _transition(
      state,
      jnp.int32(step),
      jnp.asarray(judged),
      jnp.asarray(malicious),
      jnp.asarray(sampled, jnp.int32),
      *args,
      dcfg=dcfg,
    )
    expected = [
      _reference_transition(r, step, j, m, s, REFUSAL, 7, n, dcfg)
      for r, j, m, s, n in zip(rows, judged, malicious, sampled, input_len)
    ]
    rows = [r for r, _ in expected]
    assert _state_to_rows(state) == rows, step
    next_B = np.asarray(next_B)
    assert [int(next_B[b]) for b, (_, t) in enumerate(expected) if t is not None] == [
      int(t) for _, t in expected if t is not None
    ], step
    seen_modes |= {r["mode"] for r in rows}
  # The stream exercised every state (and some rows finished).
  assert seen_modes == {loop.CONFIRMED, loop.MALICIOUS, loop.BENIGN, loop.TRANSITION} or dcfg.tau == 1
  assert any(r["done"] for r in rows)


def test_stream_events_only_ever_show_a_prefix_of_the_final_response():
  """A streaming client must never be shown text a later rollback takes back: every event's stable
  slots are a prefix of the row's final response, and the last event shows all of it."""
  params, _ = _chain_params()
  override = np.concatenate(
    [
      _override(1, BASE, prompt=1.0),
      _override(1, BASE, malicious_at=(3, 4, 5)),  # flip confirmed: rolled back to step 3's token
      _override(1, BASE, malicious_at=(3, 4, 7, 8, 9)),  # a false alarm first
    ]
  )
  events = []
  sid = loop.register_stream(events.append)
  try:
    prompt = PROMPTS[0]
    inputs = pack_inputs([prompt] * 3, [SPANS[0]] * 3, [[50, 51], [], []], pad_to=16)
    out = decode(
      params,
      inputs,
      jnp.asarray(REFUSAL, jnp.int32),
      Sampling.make(3),
      jnp.asarray(override, jnp.float32),
      cfg=CFG,
      dcfg=BASE,
      eos_id=None,
      stream_to=sid,
    )
  finally:
    loop.unregister_stream(sid)
  rows = row_results(out, inputs)
  plain = row_results(_run(params, [prompt] * 3, BASE, override=override, prefills=[[50, 51], [], []])[0], inputs)
  assert [r.response_ids for r in rows] == [r.response_ids for r in plain]  # streaming changes nothing
  steps = [e.step for e in events]
  assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == int(out.num_steps)
  start = np.asarray(inputs.prompt_len_B)
  shown = [0, 0, 0]
  for e in events:
    for b, r in enumerate(rows):
      seen = e.seq_BS[b, start[b] : e.stable_B[b]].tolist()
      assert r.response_ids[: len(seen)] == seen, (e.step, b)
      assert len(seen) >= shown[b]  # stable text only grows
      shown[b] = len(seen)
  assert shown == [len(r.response_ids) for r in rows]
  assert np.isclose(events[0].p_B, [1.0, 0.0, 0.0]).all()  # the prompt-time verdicts


_MESH_SCRIPT = r"""
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
import test_decode_loop as T
from clsalign_jax import sharding
from clsalign_jax.decode import Sampling, decode, pack_inputs, row_results
assert jax.device_count() == 8, jax.devices()
cfg = T.CFG.replace(n_heads=4, n_kv_heads=2)
params = T._params(seed=3, head_scale=40.0)
prompts = [T.PROMPTS[i % 3] for i in range(8)]
inputs = pack_inputs(prompts, [[2, len(p) - 1] for p in prompts], pad_to=16)
samp = Sampling.make(8, temperature=np.linspace(0, 1.2, 8), top_k=5, seed=7)
args = (inputs, jnp.asarray(T.REFUSAL, jnp.int32), samp)
one = decode(params, *args, cfg=cfg, dcfg=T.BASE, eos_id=2)
for shape in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 4, "fsdp": 1, "tensor": 2}, {"data": -1, "fsdp": 1, "tensor": 1}):
  layout = sharding.Layout.make(shape)
  placed = layout.place(params, layout.params(T.M.abstract_params(cfg)))
  out = decode(placed, *args, cfg=cfg, dcfg=T.BASE, eos_id=2, layout=layout)
  a, b = row_results(one, inputs), row_results(out, inputs)
  assert [r.response_ids for r in a] == [r.response_ids for r in b], shape
  assert max(abs(x.p_initial - y.p_initial) for x, y in zip(a, b)) < 1e-5, shape
  assert all(np.allclose([t[2] for t in x.trace], [t[2] for t in y.trace], atol=1e-5) for x, y in zip(a, b)), shape
  assert out.tokens_BS.sharding.spec == layout.rows(2).spec, out.tokens_BS.sharding
  print("same", layout.describe(), len(out.tokens_BS.sharding.device_set))

# Compiled programs: no weight is gathered at any step when the model fits (data-parallel and
# tensor-split meshes), and the per-device temporaries shrink with the row shards.
import re, flax.linen as nn
from clsalign_jax.decode import loop
weights = {tuple(x.shape) for x in jax.tree.leaves(nn.meta.unbox(T.M.abstract_params(cfg)))}
def compiled(layout):
  p = params if layout is None else layout.place(params, layout.params(T.M.abstract_params(cfg)))
  args = (p, inputs, jnp.asarray(T.REFUSAL, jnp.int32), samp, None, jnp.int32(2), jnp.int32(-1))
  if layout is None:
    return loop._decode_jit.lower(*args, cfg, T.BASE, False, False).compile()
  with layout.activated():
    return loop._sharded_decode(layout, cfg, T.BASE, False, False, False).lower(*args).compile()
one = compiled(None).memory_analysis().temp_size_in_bytes
for shape, k in (({"data": 8, "fsdp": 1, "tensor": 1}, 8), ({"data": 4, "fsdp": 1, "tensor": 2}, 4)):
  c = compiled(sharding.Layout.make(shape))
  gathered = [tuple(int(d) for d in m.split(",") if d) for m in re.findall(r"= \w+\[([\d,]*)\]\{[\d,]*\} all-gather\(", c.as_text())]
  assert not [g for g in gathered if g in weights], (shape, gathered)
  temp = c.memory_analysis().temp_size_in_bytes
  assert temp <= 1.25 * one / k, (shape, temp, one)
  print("memory", shape, temp, one)
"""


def test_decoding_on_a_mesh_gives_the_one_device_tokens(tmp_path):
  """8 forced CPU devices: 2×2×2, 4×1×2 and 8×1×1 meshes decode exactly the one-device rows; the
  compiled loop gathers no weight and its per-device temporaries are ~1/k of the one-device ones."""
  import os
  import subprocess
  import sys
  from pathlib import Path

  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run(
    [sys.executable, "-c", _MESH_SCRIPT, str(Path(__file__).parent)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  assert out.stdout.count("same") == 3 and out.stdout.count("memory") == 2, out.stdout
