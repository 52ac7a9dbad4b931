"""Inference-rule masks (rules 1–4) and the prompt-pass mask, checked against hand-written sets."""

import numpy as np
import pytest

from clsalign_jax import masks

S = 20
QUERY = [2, 5]  # slots 2, 3, 4
RESPONSE_START = 7
R = dict(r1=3, r2=4, r3=2)


def _cls_row(rule, pos, trigger=-1, **kw):
  row = masks.cls_inference_mask(
    np.asarray([rule]),
    np.asarray([pos]),
    np.asarray([QUERY]),
    np.asarray([RESPONSE_START]),
    np.asarray([trigger]),
    S,
    **{**R, **kw},
  )
  return set(np.flatnonzero(np.asarray(row[0])).tolist())


@pytest.mark.parametrize(
  "rule,pos,kw,expected",
  [
    (masks.RULE_MALICIOUS, 15, {}, {0, 2, 3, 4, 7, 8, 9}),
    (masks.RULE_MALICIOUS, 8, {}, {0, 2, 3, 4, 7, 8}),  # only what exists so far
    (masks.RULE_BENIGN, 15, {}, {0, 12, 13, 14, 15}),
    (masks.RULE_BENIGN, 8, {}, {0, 7, 8}),  # the first r2 steps use whatever tokens exist
    (masks.RULE_BENIGN, 15, {"rule2_query": True}, {0, 2, 3, 4, 12, 13, 14, 15}),
    (masks.RULE_TRANSITION, 15, {}, {0, 9, 10, 11, 12, 13, 14}),  # (S_t - r2, S_t + r3] with S_t = 12
    (masks.RULE_TRANSITION, 13, {}, {0, 9, 10, 11, 12, 13}),
    (masks.RULE_BENIGN, 15, {"strategic": False}, {0, 2, 3, 4, *range(7, 16)}),
  ],
)
def test_cls_inference_rules(rule, pos, kw, expected):
  assert _cls_row(rule, pos, trigger=12, **kw) == expected


def test_rows_pick_their_own_rule():
  rows = masks.cls_inference_mask(
    np.asarray([masks.RULE_MALICIOUS, masks.RULE_BENIGN, masks.RULE_TRANSITION]),
    np.asarray([15, 15, 15]),
    np.asarray([QUERY] * 3),
    np.asarray([RESPONSE_START] * 3),
    np.asarray([-1, -1, 12]),
    S,
    **R,
  )
  got = [set(np.flatnonzero(r).tolist()) for r in np.asarray(rows)]
  assert got == [
    _cls_row(masks.RULE_MALICIOUS, 15),
    _cls_row(masks.RULE_BENIGN, 15),
    _cls_row(masks.RULE_TRANSITION, 15, trigger=12),
  ]


def test_decode_token_mask_sees_cls_and_the_past_within_the_window():
  full = np.asarray(masks.decode_token_mask(np.asarray([5, 9]), 12))
  np.testing.assert_array_equal(full, np.arange(12)[None] <= np.asarray([[5], [9]]))
  windowed = np.asarray(masks.decode_token_mask(np.asarray([9]), 12, sliding_window=3))[0]
  assert set(np.flatnonzero(windowed).tolist()) == {0, 7, 8, 9}


def test_prefill_mask():
  # Row: CLS, BOS, t, q, q, q, t | prefill p, p | pad; padded to 12 slots.
  m = np.asarray(masks.prefill_mask(np.asarray([9]), np.asarray([7]), np.asarray([[3, 6]]), 10, 12))[0]
  assert m.shape == (10, 12)
  assert set(np.flatnonzero(m[0]).tolist()) == {0, 3, 4, 5}  # CLS: itself and the query only
  assert not m[1:7, 0].any()  # prompt rows do not read the CLS
  assert m[7:9, 0].all()  # attacker-prefilled response rows do
  np.testing.assert_array_equal(m[1:9, 1:9], np.tril(np.ones((8, 8), bool)))
  assert not m[9].any() and not m[:, 10:].any()


def test_masks_without_response_sees_cls_close_slot_0_to_tokens():
  for window in (None, 3):
    seen = np.asarray(masks.decode_token_mask(np.asarray([5, 9]), 12, window))
    hidden = np.asarray(masks.decode_token_mask(np.asarray([5, 9]), 12, window, response_sees_cls=False))
    assert seen[:, 0].all() and not hidden[:, 0].any()
    np.testing.assert_array_equal(hidden[:, 1:], seen[:, 1:])
  args = (np.asarray([9]), np.asarray([7]), np.asarray([[3, 6]]), 10, 12)
  seen, hidden = (np.asarray(masks.prefill_mask(*args, response_sees_cls=flag))[0] for flag in (True, False))
  assert not hidden[1:, 0].any()  # attacker-prefilled rows no longer read the CLS
  np.testing.assert_array_equal(hidden[0], seen[0])  # the CLS still judges the query
  np.testing.assert_array_equal(hidden[:, 1:], seen[:, 1:])
