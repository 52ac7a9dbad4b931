"""Training masks against an independent brute-force reference, on random span layouts."""

import itertools
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from clsalign_jax import masks


def _random_row(rng, T, n_max):
  """Packed row: segments of [CLS, template…, query…, template…, response…(EOS)], then padding."""
  seg = np.zeros(T, np.int32)
  q = np.zeros((n_max, 2), np.int32)
  r = np.zeros((n_max, 2), np.int32)
  labels = np.zeros(n_max, np.int32)
  pos, n = 0, 0
  while n < n_max:
    pre, qlen, mid, rlen = rng.randint(0, 3), rng.randint(0, 4), rng.randint(0, 3), rng.randint(0, 4)
    length = 1 + pre + qlen + mid + rlen
    if pos + length > T:
      break
    seg[pos : pos + length] = n + 1
    q[n] = (pos + 1 + pre, pos + 1 + pre + qlen)
    r[n] = (pos + 1 + pre + qlen + mid, pos + length)
    labels[n] = rng.randint(0, 2)
    pos += length
    n += 1
    if rng.rand() < 0.3:
      break
  return seg, q, r, labels


CLS_WINDOW = 2


def _reference(seg, q, r, labels, mode, window, cls_response, response_sees_cls=True):
  T = len(seg)
  ref = np.zeros((T, T), bool)

  def segment_of(i):
    return seg[i] - 1

  def in_span(i, spans):
    n = segment_of(i)
    return spans[n][0] <= i < spans[n][1]

  def is_cls(i):
    return seg[i] > 0 and (i == 0 or seg[i - 1] != seg[i])

  def cls_reads_response(j):
    n = segment_of(j)
    if cls_response == "none" or not in_span(j, r):
      return False
    if cls_response == "window":  # the last CLS_WINDOW response tokens, either label
      return j >= r[n][1] - CLS_WINDOW
    full = labels[n] == (0 if cls_response == "benign_full" else 1)
    return full or j == r[n][0]

  for i, j in itertools.product(range(T), range(T)):
    if seg[i] == 0 or seg[j] == 0 or seg[i] != seg[j]:
      continue
    if is_cls(i):
      if mode == "pretrain":
        ref[i, j] = True
      else:
        ref[i, j] = i == j or in_span(j, q) or cls_reads_response(j)
    elif is_cls(j):
      ref[i, j] = mode == "sft" and response_sees_cls and in_span(i, r)
    else:
      ref[i, j] = j <= i and (window is None or i - j < window)
  return ref


@pytest.mark.parametrize(
  "mode,cls_response,window,response_sees_cls",
  [
    ("sft", "none", None, True),
    ("sft", "none", 3, True),
    ("sft", "benign_full", None, True),
    ("sft", "malicious_full", 4, True),
    ("pretrain", "none", None, True),
    ("pretrain", "none", 2, True),
    ("sft", "none", None, False),
    ("sft", "benign_full", 3, False),
    ("pretrain", "none", None, False),
    ("sft", "window", None, True),
    ("sft", "window", 3, False),
  ],
)
def test_training_mask_matches_brute_force(mode, cls_response, window, response_sees_cls):
  rng = np.random.RandomState(zlib.crc32(f"{mode}{cls_response}{window}{response_sees_cls}".encode()))
  T, n_max, B = 14, 3, 64
  rows = [_random_row(rng, T, n_max) for _ in range(B)]
  seg, q, r, labels = (np.stack(x) for x in zip(*rows))
  got = np.asarray(
    masks.cls_training_mask(
      jnp.asarray(seg),
      jnp.asarray(q),
      jnp.asarray(r),
      mode=mode,
      sliding_window=window,
      cls_response=cls_response,
      cls_label=jnp.asarray(labels),
      response_sees_cls=response_sees_cls,
      cls_window=CLS_WINDOW,
    )
  )
  for b in range(B):
    ref = _reference(seg[b], q[b], r[b], labels[b], mode, window, cls_response, response_sees_cls)
    np.testing.assert_array_equal(got[b], ref, err_msg=f"row {b}: seg={seg[b]} q={q[b]} r={r[b]}")


def test_single_example_spans_accept_b2_layout():
  seg = jnp.array([[1, 1, 1, 1, 1, 1, 0, 0]])
  q, r = jnp.array([[2, 4]]), jnp.array([[4, 6]])
  mask = np.asarray(masks.cls_training_mask(seg, q, r))
  np.testing.assert_array_equal(mask[0, 0], [1, 0, 1, 1, 0, 0, 0, 0])  # CLS reads itself + query
  np.testing.assert_array_equal(mask[0, :, 0], [1, 0, 0, 0, 1, 1, 0, 0])  # only response rows read CLS
  np.testing.assert_array_equal(mask[0, 3], [0, 1, 1, 1, 0, 0, 0, 0])  # query row: causal, no CLS
  assert not mask[0, 6:].any() and not mask[0, :, 6:].any()  # padding is invisible


def test_causal_mask_with_window_and_segments():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  mask = np.asarray(masks.causal_mask(seg, sliding_window=2))
  expected = np.array(
    [
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 1, 1, 0, 0, 0],
      [0, 0, 0, 1, 0, 0],
      [0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0, 0],
    ],
    bool,
  )
  np.testing.assert_array_equal(mask[0], expected)


def test_bad_options_are_named():
  seg = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="mask mode"):
    masks.cls_training_mask(seg, mode="bogus")
  with pytest.raises(ValueError, match="need query_span"):
    masks.cls_training_mask(seg, mode="sft")
  with pytest.raises(ValueError, match="needs cls_label"):
    masks.cls_training_mask(seg, jnp.array([[1, 2]]), jnp.array([[2, 4]]), cls_response="benign_full")
