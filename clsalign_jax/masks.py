"""Boolean attention masks (True = may attend), pure functions of segment ids and token spans.

Training rules (docs/method.md §2.1; decisions 1–2 in its §6):
  pretrain  CLS row sees every valid token of its segment; no token sees CLS.
  sft       CLS row sees {CLS} ∪ query span (optionally a label-dependent response span);
            response rows (EOS included) see CLS; template and query rows do not.
`response_sees_cls=False` closes the CLS column in both modes: no token reads the CLS, so the
LM is the plain causal model and the CLS only feeds the safety head.
Every other pair follows ordinary causal attention within a segment, with padding
(segment id 0) masked and an optional sliding window. The window limits token→token
pairs only: the CLS row and the CLS column follow their own rules at any distance.

Spans are half-open token index ranges, absolute within the row: [B, 2] for one example
per row, or [B, N, 2] for packed rows where span n belongs to segment id n + 1.
The CLS of a segment is its first token.
"""

from __future__ import annotations

import jax.numpy as jnp

CLS_RESPONSE_MODES = ("none", "benign_full", "malicious_full", "window")


def causal_mask(segment_ids_BT, sliding_window: int | None = None):
  """Plain causal LM mask: same segment, key not after query, both valid, within the window."""
  T = segment_ids_BT.shape[-1]
  i_T1 = jnp.arange(T)[:, None]
  j_1T = jnp.arange(T)[None, :]
  valid_BT = segment_ids_BT > 0
  mask_BTT = (
    (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    & valid_BT[:, :, None]
    & valid_BT[:, None, :]
    & (j_1T <= i_T1)
  )
  if sliding_window is not None:
    mask_BTT &= (i_T1 - j_1T) < sliding_window
  return mask_BTT


def segment_starts(segment_ids_BT):
  """True at the first token of every segment (where the CLS sits)."""
  prev_BT = jnp.pad(segment_ids_BT[:, :-1], ((0, 0), (1, 0)))
  return (segment_ids_BT > 0) & (segment_ids_BT != prev_BT)


def _as_spans_BN2(span):
  span = jnp.asarray(span)
  return span[:, None, :] if span.ndim == 2 else span


def span_membership(segment_ids_BT, span_BN2):
  """[B, T] True where a token lies inside the span of its own segment."""
  span_BN2 = _as_spans_BN2(span_BN2)
  T = segment_ids_BT.shape[-1]
  idx_11T = jnp.arange(T)[None, None, :]
  seg_B1T = segment_ids_BT[:, None, :]
  n_1N1 = jnp.arange(span_BN2.shape[1])[None, :, None] + 1
  inside_BNT = (seg_B1T == n_1N1) & (idx_11T >= span_BN2[:, :, 0:1]) & (idx_11T < span_BN2[:, :, 1:2])
  return inside_BNT.any(axis=1)


def cls_visible_response(response_span, cls_label, mode: str, window: int = 15):
  """The part of each response span the CLS row may read under the label-dependent option.

  `benign_full`: benign examples expose the whole response, malicious ones only its first
  token (the released dataset code); `malicious_full` is the inverted variant. `window`: the last
  `window` response tokens of every example, whatever its label: with the query, what Rule 2
  shows the CLS at decode time when `rule2_include_query` is on (the CLS learns to read answers
  and refusals, not only queries).
  """
  span_BN2 = _as_spans_BN2(response_span)
  if mode == "window":
    start_BN, end_BN = span_BN2[..., 0], span_BN2[..., 1]
    return jnp.stack([jnp.maximum(start_BN, end_BN - window), end_BN], axis=-1)
  label_BN = jnp.asarray(cls_label).reshape(span_BN2.shape[:2])
  full_label = 0 if mode == "benign_full" else 1
  start_BN, end_BN = span_BN2[..., 0], span_BN2[..., 1]
  end_BN = jnp.where(label_BN == full_label, end_BN, jnp.minimum(end_BN, start_BN + 1))
  return jnp.stack([start_BN, end_BN], axis=-1)


def cls_training_mask(
  segment_ids_BT,
  query_span=None,
  response_span=None,
  *,
  mode: str = "sft",
  sliding_window: int | None = None,
  cls_response: str = "none",
  cls_label=None,
  response_sees_cls: bool = True,
  cls_window: int = 15,
):
  """[B, T, T] training mask with a CLS at the start of every segment."""
  if mode not in ("sft", "pretrain"):
    raise ValueError(f"mask mode {mode!r}; expected 'sft' or 'pretrain'")
  if cls_response not in CLS_RESPONSE_MODES:
    raise ValueError(f"cls_response {cls_response!r}; expected one of {CLS_RESPONSE_MODES}")
  valid_BT = segment_ids_BT > 0
  same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  is_cls_BT = segment_starts(segment_ids_BT)
  base_BTT = causal_mask(segment_ids_BT, sliding_window)
  T = segment_ids_BT.shape[-1]
  diag_TT = jnp.eye(T, dtype=bool)[None]

  if mode == "pretrain":
    cls_row_BTT = same_BTT & valid_BT[:, None, :]
    cls_col_BTT = jnp.zeros_like(base_BTT)
  else:
    if query_span is None or response_span is None:
      raise ValueError("sft masks need query_span and response_span")
    cls_sees_BT = span_membership(segment_ids_BT, query_span)
    if cls_response != "none":
      if cls_label is None and cls_response != "window":
        raise ValueError(f"cls_response={cls_response!r} needs cls_label")
      cls_sees_BT |= span_membership(
        segment_ids_BT, cls_visible_response(response_span, cls_label, cls_response, cls_window)
      )
    cls_row_BTT = same_BTT & (cls_sees_BT[:, None, :] | diag_TT)
    is_resp_BT = span_membership(segment_ids_BT, response_span) & response_sees_cls
    cls_col_BTT = same_BTT & is_resp_BT[:, :, None]

  mask_BTT = jnp.where(is_cls_BT[:, None, :], cls_col_BTT, base_BTT)
  mask_BTT = jnp.where(is_cls_BT[:, :, None], cls_row_BTT, mask_BTT)
  return mask_BTT & valid_BT[:, :, None] & valid_BT[:, None, :]


# CLS views (data/views.py): the tokens of an example run once into a KV cache, laid out as a shared
# prompt (branch 0) and responses that each continue it (branches 1, 2, ...); the K view rows then
# read that cache as the CLS row of a decode step does.


def branch_mask(branch_BT):
  """[B, T, T]: a row sees the earlier rows of the prompt (branch 0) and of its own branch; -1 is
  padding (sees and is seen by nothing)."""
  T = branch_BT.shape[-1]
  valid_BT = branch_BT >= 0
  earlier_1TT = (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None]
  same_BTT = (branch_BT[:, None, :] == 0) | (branch_BT[:, None, :] == branch_BT[:, :, None])
  return earlier_1TT & same_BTT & valid_BT[:, :, None] & valid_BT[:, None, :]


def view_rows_mask(query_span_B2, view_window_BK2, view_query_BK, num_tokens: int):
  """[B, K, T + K]: view row k (in slot T + k) reads itself, the query where `view_query_BK`, and its
  half-open response window of slots (Rule 4: never the template)."""
  K = view_query_BK.shape[1]
  j_11S = jnp.arange(num_tokens + K)[None, None, :]
  col = lambda x_BK: x_BK[..., None]
  in_query_BKS = (j_11S >= col(query_span_B2[:, 0:1])) & (j_11S < col(query_span_B2[:, 1:2])) & col(view_query_BK)
  in_window_BKS = (j_11S >= col(view_window_BK2[..., 0])) & (j_11S < col(view_window_BK2[..., 1]))
  self_1KS = j_11S == (num_tokens + jnp.arange(K))[None, :, None]
  return in_query_BKS | in_window_BKS | self_1KS


# Inference rules (docs/method.md §2.2; decisions 5–6 in its §6). At decode time the key axis is the
# KV-cache slot axis; a row's token at position p lives in slot p and the CLS in slot 0, so
# spans and positions index slots directly. `pos_B` is the newest filled slot (the token fed
# in this step), `response_start_B` the first response slot the CLS may read.
RULE_MALICIOUS, RULE_BENIGN, RULE_TRANSITION = 1, 2, 3


def prefill_mask(
  input_len_B,
  prompt_len_B,
  query_span_B2,
  num_rows: int,
  num_slots: int,
  sliding_window: int | None = None,
  response_sees_cls: bool = True,
):
  """[B, num_rows, num_slots] mask of the prompt pass (right-padded rows, row i in slot i).

  The CLS row follows Rule 4 and judges the query only; prompt rows do not see the CLS;
  attacker-prefilled response rows [prompt_len, input_len) do, as response rows in SFT
  (unless `response_sees_cls` is False).
  """
  seg_BT = (jnp.arange(num_rows)[None, :] < input_len_B[:, None]).astype(jnp.int32)
  response_span_B2 = jnp.stack([prompt_len_B, input_len_B], axis=-1)
  mask_BTT = cls_training_mask(
    seg_BT,
    query_span_B2,
    response_span_B2,
    mode="sft",
    sliding_window=sliding_window,
    response_sees_cls=response_sees_cls,
  )
  return jnp.pad(mask_BTT, ((0, 0), (0, 0), (0, num_slots - num_rows)))


def decode_token_mask(pos_B, num_slots: int, sliding_window: int | None = None, response_sees_cls: bool = True):
  """[B, S] row of a generated token: every filled slot up to its own, the CLS slot included
  unless `response_sees_cls` is False (response tokens read the safety state), within the
  window for token→token pairs."""
  j_1S = jnp.arange(num_slots)[None, :]
  mask_BS = j_1S <= pos_B[:, None]
  if sliding_window is not None:
    mask_BS &= ((pos_B[:, None] - j_1S) < sliding_window) | (j_1S == 0)
  if not response_sees_cls:
    mask_BS &= j_1S > 0
  return mask_BS


def cls_inference_mask(
  rule_B,
  pos_B,
  query_span_B2,
  response_start_B,
  trigger_pos_B,
  num_slots: int,
  *,
  r1: int,
  r2: int,
  r3: int,
  rule2_query: bool = False,
  strategic: bool = True,
):
  """[B, S] row of a re-classifying CLS (slot 0). It always reads itself, never BOS or template
  (Rule 4), and among response slots [response_start, pos]:
    Rule 1 (initially malicious): the query and the first r1 response tokens;
    Rule 2 (benign): the latest r2 response tokens (plus the query if `rule2_query`);
    Rule 3 (flip at S_t = trigger_pos): response tokens in (S_t − r2, S_t + r3], i.e. the
           Rule-2 window at the flip plus r3 later tokens (plus the query if `rule2_query`).
  Without strategic attention: the query and every response token so far.
  """
  j_1S = jnp.arange(num_slots)[None, :]
  col = lambda x_B: x_B[:, None]
  in_query_BS = (j_1S >= col(query_span_B2[:, 0])) & (j_1S < col(query_span_B2[:, 1]))
  response_BS = (j_1S >= col(response_start_B)) & (j_1S <= col(pos_B))
  if not strategic:
    return (j_1S == 0) | in_query_BS | response_BS
  rule1_BS = in_query_BS | (response_BS & (j_1S < col(response_start_B + r1)))
  rule2_BS = response_BS & (j_1S > col(pos_B - r2))
  rule3_BS = response_BS & (j_1S > col(trigger_pos_B - r2)) & (j_1S <= col(trigger_pos_B + r3))
  if rule2_query:
    rule2_BS |= in_query_BS
    rule3_BS |= in_query_BS
  rule_B1 = col(rule_B)
  chosen_BS = jnp.where(rule_B1 == RULE_MALICIOUS, rule1_BS, jnp.where(rule_B1 == RULE_TRANSITION, rule3_BS, rule2_BS))
  return (j_1S == 0) | chosen_BS
