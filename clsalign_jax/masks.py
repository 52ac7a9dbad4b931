"""Boolean attention masks (True = may attend), pure functions of segment ids and token spans.

Training rules (method.md §2.1, project decisions 1–2):
  pretrain  CLS row sees every valid token of its segment; no token sees CLS.
  sft       CLS row sees {CLS} ∪ query span (optionally a label-dependent response span);
            response rows (EOS included) see CLS; template and query rows do not.
Every other pair follows ordinary causal attention within a segment, with padding
(segment id 0) masked and an optional sliding window. The window limits token→token
pairs only: the CLS row and the CLS column follow their own rules at any distance.

Spans are half-open token index ranges, absolute within the row: [B, 2] for one example
per row, or [B, N, 2] for packed rows where span n belongs to segment id n + 1.
The CLS of a segment is its first token.
"""

from __future__ import annotations

import jax.numpy as jnp

CLS_RESPONSE_MODES = ("none", "benign_full", "malicious_full")


def causal_mask(segment_ids_BT, sliding_window: int | None = None):
  """Plain causal LM mask: same segment, key not after query, both valid, within the window."""
  T = segment_ids_BT.shape[-1]
  i_T1 = jnp.arange(T)[:, None]
  j_1T = jnp.arange(T)[None, :]
  valid_BT = segment_ids_BT > 0
  mask_BTT = ((segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
              & valid_BT[:, :, None] & valid_BT[:, None, :] & (j_1T <= i_T1))
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


def cls_visible_response(response_span, cls_label, mode: str):
  """The part of each response span the CLS row may read under the label-dependent option.

  `benign_full`: benign examples expose the whole response, malicious ones only its first
  token (the released dataset code); `malicious_full` is the inverted variant.
  """
  span_BN2 = _as_spans_BN2(response_span)
  label_BN = jnp.asarray(cls_label).reshape(span_BN2.shape[:2])
  full_label = 0 if mode == "benign_full" else 1
  start_BN, end_BN = span_BN2[..., 0], span_BN2[..., 1]
  end_BN = jnp.where(label_BN == full_label, end_BN, jnp.minimum(end_BN, start_BN + 1))
  return jnp.stack([start_BN, end_BN], axis=-1)


def cls_training_mask(segment_ids_BT, query_span=None, response_span=None, *, mode: str = "sft",
                      sliding_window: int | None = None, cls_response: str = "none", cls_label=None):
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
      if cls_label is None:
        raise ValueError(f"cls_response={cls_response!r} needs cls_label")
      cls_sees_BT |= span_membership(segment_ids_BT, cls_visible_response(response_span, cls_label, cls_response))
    cls_row_BTT = same_BTT & (cls_sees_BT[:, None, :] | diag_TT)
    is_resp_BT = span_membership(segment_ids_BT, response_span)
    cls_col_BTT = same_BTT & is_resp_BT[:, :, None]

  mask_BTT = jnp.where(is_cls_BT[:, None, :], cls_col_BTT, base_BTT)
  mask_BTT = jnp.where(is_cls_BT[:, :, None], cls_row_BTT, mask_BTT)
  return mask_BTT & valid_BT[:, :, None] & valid_BT[:, None, :]
