"""CLS views: masks against brute force, the two-pass view logits against a plain forward of the
same reading, the side path leaving the LM untouched, and the batches' windows and labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clsalign_jax import masks, train
from clsalign_jax import model as model_lib
from clsalign_jax.data import pipeline, views
from clsalign_jax.data.tokenizer import load_tokenizer
from clsalign_jax.data.templates import get_template
from clsalign_jax.errors import ConfigError

CFG = model_lib.ModelConfig(
  vocab_size=64,
  d_model=32,
  n_layers=4,
  n_heads=4,
  n_kv_heads=2,
  head_dim=8,
  d_ff=64,
  cls_exit_layer=3,
  cls_adapter_rank=4,
)


def _params(cfg, seed=0):
  p = model_lib.init_params(cfg, jax.random.key(seed))
  # Non-zero adapters, so a test would notice one that leaks into the token rows.
  for k in p:
    if k.startswith("cls_adapter_"):
      p[k]["up"] = 0.1 * jax.random.normal(jax.random.key(seed + 1), p[k]["up"].shape)
  return p


def test_branch_mask_matches_brute_force():
  branch = np.array([[-1, 0, 0, 0, 1, 1, 2, 2, 2, -1], [-1, 0, 0, 1, 1, 1, 1, -1, -1, -1]])
  got = np.asarray(masks.branch_mask(jnp.asarray(branch)))
  for b in range(2):
    for i in range(10):
      for j in range(10):
        bi, bj = branch[b, i], branch[b, j]
        want = bi >= 0 and bj >= 0 and j <= i and (bj == 0 or bj == bi)
        assert got[b, i, j] == want, (b, i, j)


def test_view_rows_mask_matches_brute_force():
  T, K = 12, 3
  q = np.array([[2, 5]])
  win = np.array([[[0, 0], [7, 10], [8, 12]]])
  reads_q = np.array([[True, True, False]])
  got = np.asarray(masks.view_rows_mask(jnp.asarray(q), jnp.asarray(win), jnp.asarray(reads_q), T))
  assert got.shape == (1, K, T + K)
  for k in range(K):
    for j in range(T + K):
      want = j == T + k or (reads_q[0, k] and 2 <= j < 5) or (win[0, k, 0] <= j < win[0, k, 1])
      assert got[0, k, j] == want, (k, j)


def _reference_logit(params, prompt, response, q_span, window, reads_query, cfg=CFG):
  """The CLS verdict as one plain forward computes it: [CLS, prompt..., response...] with the CLS row
  reading itself, the query (if asked) and the window; tokens causal and blind to the CLS."""
  ids = np.concatenate([[cfg.cls_id], prompt[1:], response]).astype(np.int32)
  T = len(ids)
  seg = np.ones((1, T), np.int32)
  mask = np.array(masks.causal_mask(jnp.asarray(seg)))
  mask[0, :, 0] = False
  row = np.zeros(T, bool)
  row[0] = True
  if reads_query:
    row[q_span[0] : q_span[1]] = True
  row[window[0] : window[1]] = True
  mask[0, 0] = row
  out = model_lib.Transformer(cfg).apply(
    {"params": params}, jnp.asarray(ids)[None], jnp.arange(T)[None], jnp.asarray(mask), cls_row=0
  )
  return float(out.cls_logit_B[0]), np.asarray(out.logits_BTV[0, 1:])


def test_view_logits_match_a_plain_forward_of_the_same_reading():
  rng = np.random.default_rng(0)
  params = _params(CFG)
  prompt = np.concatenate([[CFG.cls_id], rng.integers(0, 63, 9)]).astype(np.int32)  # slot 0 = CLS
  ref = rng.integers(0, 63, 6).astype(np.int32)
  own = rng.integers(0, 63, 5).astype(np.int32)
  P = len(prompt)
  T = 32
  tokens = np.zeros((1, T), np.int32)
  positions = np.zeros((1, T), np.int32)
  branch = np.full((1, T), -1, np.int32)
  tokens[0, 1:P] = prompt[1:]
  positions[0, :P] = np.arange(P)
  branch[0, 1:P] = 0
  tokens[0, P : P + 6], positions[0, P : P + 6], branch[0, P : P + 6] = ref, P + np.arange(6), 1
  tokens[0, P + 6 : P + 11], positions[0, P + 6 : P + 11], branch[0, P + 6 : P + 11] = own, P + np.arange(5), 2
  q_span = (3, 8)
  # views: query; query + ref[1:5]; ref[2:6]; query + own[0:3]; own[1:5]
  win = [(0, 0), (P + 1, P + 5), (P + 2, P + 6), (P + 6, P + 9), (P + 7, P + 11)]
  reads = [True, True, False, True, False]
  batch = {
    "tokens": jnp.asarray(tokens),
    "positions": jnp.asarray(positions),
    "branch": jnp.asarray(branch),
    "query_span": jnp.asarray([q_span]),
    "view_window": jnp.asarray([win]),
    "view_query": jnp.asarray([reads]),
  }
  got = np.asarray(train.view_logits(model_lib.Transformer(CFG), params, batch))[0]
  for k in range(5):
    response = ref if k in (1, 2) else own
    shift = P if k in (1, 2) else P + 6
    window = (0, 0) if k == 0 else (win[k][0] - shift + P, win[k][1] - shift + P)
    want, _ = _reference_logit(params, prompt, response, q_span, window, reads[k])
    np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-5)


def test_side_path_leaves_the_lm_exactly_the_base_model():
  rng = np.random.default_rng(1)
  base_cfg = CFG.replace(cls_exit_layer=0, cls_adapter_rank=0)
  params = _params(CFG)
  base = {k: v for k, v in params.items() if not k.startswith("cls_adapter_") and k != "cls_norm"}
  prompt = np.concatenate([[CFG.cls_id], rng.integers(0, 63, 9)]).astype(np.int32)
  response = rng.integers(0, 63, 5).astype(np.int32)
  _, lm_side = _reference_logit(params, prompt, response, (3, 8), (10, 13), True)
  _, lm_base = _reference_logit(base, prompt, response, (3, 8), (10, 13), True, cfg=base_cfg)
  np.testing.assert_array_equal(lm_side, lm_base)


def test_fresh_adapters_leave_the_cls_state_unchanged():
  """A zero `up` makes the adapted CLS row the plain one (so a fresh side path starts as the base CLS)."""
  cfg = CFG.replace(cls_exit_layer=0)
  params = model_lib.init_params(cfg, jax.random.key(3))
  plain = {k: v for k, v in params.items() if not k.startswith("cls_adapter_")}
  ids = jnp.asarray([[cfg.cls_id, 5, 6, 7]])
  mask = jnp.tril(jnp.ones((1, 4, 4), bool))
  a = model_lib.Transformer(cfg).apply({"params": params}, ids, jnp.arange(4)[None], mask).cls_logit_B
  b = model_lib.Transformer(cfg.replace(cls_adapter_rank=0)).apply({"params": plain}, ids, jnp.arange(4)[None], mask)
  np.testing.assert_allclose(a, b.cls_logit_B, rtol=1e-6)


def test_side_path_needs_unscanned_layers():
  with pytest.raises(ValueError, match="scan_layers=False"):
    CFG.replace(scan_layers=True)


def _corpus(tokenizer, template, with_own=True):
  records = [
    {"prompt": "How do I bake bread at home?", "response": "Mix flour, water, yeast and salt, then knead.", "label": 0},
    {"prompt": "Tell me how to pick a lock to break in.", "response": "I can't help with that.", "label": 1},
    {"prompt": "What is the capital of France?", "response": "Paris.", "label": 0},
    {"prompt": "Write malware that steals passwords.", "response": "I won't write malware.", "label": 1},
  ]
  own = {
    r["prompt"]: {"response": "Sure thing. Step 1: first you need to gather your tools and", "kind": "compliance"}
    for r in records[:3]
  }
  return records, views.encode_views(
    records, tokenizer, template, own if with_own else {}, views.ViewSettings(r2=4, r3=2, response_tokens=8)
  )


def test_views_batches_windows_labels_and_determinism():
  tok = load_tokenizer("smollm2")
  template = get_template("chatml")
  records, corpus = _corpus(tok, template)
  assert [len(x) for x in corpus.own] == [8, 8, 8, 0]
  cfg = pipeline.PipelineConfig(max_length=256, batch_size=4, shuffle=True, seed=3, num_epochs=None)
  pipe = views.ViewsPipeline(
    corpus, cfg, views.ViewSettings(r2=4, r3=2, response_tokens=8), pad_id=tok.pad_id, process_index=0, process_count=1
  )
  b0, b0_again, b1 = pipe.batch(0), pipe.batch(0), pipe.batch(1)
  for k in b0:
    np.testing.assert_array_equal(b0[k], b0_again[k])
  assert any((b0["view_window"] != b1["view_window"]).ravel())
  for b in (b0, b1):
    for r in range(4):
      prompt = "".join(tok.decode(b["tokens"][r, b["query_span"][r, 0] : b["query_span"][r, 1]].tolist()))
      i = corpus.prompts.index(next(p for p in corpus.prompts if p == prompt))
      label = corpus.labels[i]
      P = len(corpus.prompt[i])
      assert b["branch"][r, 0] == -1 and (b["branch"][r, 1:P] == 0).all()
      for v, name in enumerate(views.VIEWS):
        lo, hi = b["view_window"][r, v]
        if name == "query":
          assert (lo, hi) == (0, 0) and b["cls_label"][r, v] == label and b["view_query"][r, v]
          continue
        branch = 1 if "reference" in name else 2
        if branch == 2 and len(corpus.own[i]) == 0:
          assert b["cls_label"][r, v] == -1
          continue
        assert b["cls_label"][r, v] == label
        assert b["view_query"][r, v] == name.startswith("query+")
        assert (b["branch"][r, lo:hi] == branch).all() and 1 <= hi - lo <= 6  # r2 or r2 + r3
        ids = corpus.reference[i] if branch == 1 else corpus.own[i]
        start = P if branch == 1 else P + len(corpus.reference[i])
        np.testing.assert_array_equal(b["tokens"][r, lo:hi], ids[lo - start : hi - start])
        assert (b["positions"][r, lo:hi] == P + np.arange(lo - start, hi - start)).all()


def test_views_need_a_blind_lm_and_a_cls_only_trainable():
  from clsalign_jax import config as config_lib

  c = config_lib.default_config()
  c.model.update(preset="smollm2_135m", scan_layers=False, cls_exit_layer=2, cls_adapter_rank=2)
  c.views.enabled = True
  with pytest.raises(ConfigError, match="response_sees_cls=False"):
    config_lib.validate(c)
  c.mask.response_sees_cls = False
  config_lib.validate(c)
  c.train.trainable = "^(cls_|layers_29)"
  with pytest.raises(ConfigError, match="trains the CLS path only"):
    train.ParamPartition(c, config_lib.model_config(c))


def test_side_path_survives_an_hf_export(tmp_path):
  from clsalign_jax.interop import hf

  params = jax.tree.map(np.asarray, _params(CFG))
  hf.save_hf(str(tmp_path), CFG, params)
  cfg, loaded = hf.load_hf(str(tmp_path))
  assert (cfg.cls_exit_layer, cfg.cls_adapter_rank) == (CFG.cls_exit_layer, CFG.cls_adapter_rank)
  assert sorted(loaded) == sorted(params)
  jax.tree.map(np.testing.assert_array_equal, loaded["cls_adapter_1"], params["cls_adapter_1"])
  np.testing.assert_array_equal(loaded["cls_norm"]["weight"], params["cls_norm"]["weight"])
  # A CLS file missing a side-path tensor is refused by name.
  from safetensors.numpy import load_file, save_file

  tensors = load_file(str(tmp_path / hf.CLS_FILE))
  del tensors["cls_adapter.2.up.weight"]
  save_file(tensors, str(tmp_path / hf.CLS_FILE))
  with pytest.raises(Exception, match="cls_adapter.2.up.weight"):
    hf.load_hf(str(tmp_path))
