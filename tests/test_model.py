"""Model parity against HF transformers (torch, CPU, fp32) and [CLS] behaviour."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from clsalign_jax import masks
from clsalign_jax import model as M
from clsalign_jax.interop import gguf as G
from clsalign_jax.interop import hf

T_LONG = 320


def _tiny_hf(kind: str, seed: int = 0):
  torch.manual_seed(seed)
  common = dict(
    vocab_size=257,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
  )
  if kind == "llama_gqa":
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=5000.0, **common))
  elif kind == "llama_tied":
    common.update(num_key_value_heads=4)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **common))
  elif kind == "mistral_window":
    m = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=48, rope_theta=1e6, **common))
  elif kind in LLAMA3_ROPE:
    # Llama-3.1-8B / 3.2-1B shapes scaled down: GQA 4:1, theta 5e5, and an original context of 64
    # so the llama3 frequency bands (stretched, blended, kept) all act within T_LONG tokens.
    common.update(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, head_dim=16)
    rope = {"rope_theta": 500000.0, **LLAMA3_ROPE[kind]}
    m = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(rope_parameters=rope, tie_word_embeddings=kind == "llama32_tied", **common)
    )
  elif kind in ("llama_linear", "llama_dynamic"):
    # dynamic grows the base once positions pass max_position_embeddings: 256 < T_LONG.
    common.update(max_position_embeddings=256)
    rope = {"rope_type": kind.split("_")[1], "rope_theta": 10000.0, "factor": 4.0}
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_parameters=rope, **common))
  elif kind in ("qwen2_untied", "qwen2_tied"):
    # Qwen2.5-0.5B's traits (GQA, theta 1e6, q/k/v biases) at a tiny size.
    common.update(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, head_dim=16)
    m = transformers.Qwen2ForCausalLM(
      transformers.Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **common)
      if kind == "qwen2_untied"
      else transformers.Qwen2Config(rope_theta=1e6, tie_word_embeddings=True, **common)
    )
  else:
    raise ValueError(kind)
  # HF inits norms to 1 and biases to 0; random ones make the test sensitive to scale mix-ups
  # and to a bias added to the wrong projection (or not at all).
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.5)
  return m.eval()


def _import(m, tmp_path):
  m.save_pretrained(tmp_path)
  return hf.load_hf(str(tmp_path))


def _forward(cfg, params, tokens_BT, segment_ids_BT, cls_row=None):
  B, T = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = masks.causal_mask(jnp.asarray(segment_ids_BT), cfg.sliding_window)
  out = M.Transformer(cfg).apply(
    {"params": M.to_layout(params, cfg)}, jnp.asarray(tokens_BT), positions_BT, mask, cls_row=cls_row
  )
  return np.asarray(out.logits_BTV)


LLAMA3_ROPE = {
  "llama31_untied": {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
  },
  "llama32_tied": {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
  },
}
QWEN2 = ("qwen2_untied", "qwen2_tied")
PARITY_CASES = [
  (kind, scan) for kind in ("llama_gqa", "mistral_window", "llama_tied", *LLAMA3_ROPE, *QWEN2) for scan in (False, True)
] + [("llama_linear", False), ("llama_dynamic", False)]


@pytest.mark.parametrize("kind,scan", PARITY_CASES, ids=[f"{k}-{'scan' if s else 'loop'}" for k, s in PARITY_CASES])
def test_parity_with_transformers(kind, scan, tmp_path, record_figure):
  m = _tiny_hf(kind)
  cfg, params = _import(m, tmp_path)
  cfg = cfg.replace(scan_layers=scan)
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, cfg.vocab_size, (2, T_LONG))
  valid = np.ones((2, T_LONG), np.int64)
  valid[1, T_LONG - 37 :] = 0  # right padding in the second row
  with torch.no_grad():
    ref = m(torch.tensor(tokens), attention_mask=torch.tensor(valid)).logits.numpy()
  ours = _forward(cfg, params, tokens, valid.astype(np.int32))
  keep = valid.astype(bool)
  err = np.abs(ours[keep] - ref[keep]).max()
  record_figure(f"max|dlogits| {kind} T={T_LONG} {'scan' if scan else 'loop'}", err)
  assert err <= 1e-4
  if kind == "mistral_window":
    # The window must matter at this length, or the comparison proves nothing about it.
    unwindowed = _forward(cfg.replace(sliding_window=None), params, tokens, valid.astype(np.int32))
    assert np.abs(unwindowed[keep] - ref[keep]).max() > 1e-3
  if cfg.rope_type != "default":
    # Likewise the scaling: plain RoPE must miss the reference by far more than the bound.
    unscaled = _forward(cfg.replace(rope_type="default"), params, tokens, valid.astype(np.int32))
    assert np.abs(unscaled[keep] - ref[keep]).max() > 1e-3
  if cfg.qkv_bias:
    # And the q/k/v biases: without them the logits must miss as well.
    assert kind in QWEN2 and cfg.tie_embeddings == (kind == "qwen2_tied")
    unbiased = jax.tree_util.tree_map_with_path(
      lambda path, x: np.zeros_like(x) if str(path[-1].key).endswith("_bias") else x, params
    )
    assert np.abs(_forward(cfg, unbiased, tokens, valid.astype(np.int32))[keep] - ref[keep]).max() > 1e-3


def test_tied_config_has_no_lm_head(tmp_path):
  cfg, params = _import(_tiny_hf("llama_tied"), tmp_path)
  assert cfg.tie_embeddings and "lm_head" not in params
  boxed = M.abstract_params(cfg)
  assert "lm_head" not in boxed


def test_remat_policies_keep_values_and_gradients():
  cfg = M.ModelConfig(
    vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, scan_layers=True
  )
  params = M.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  mask = masks.causal_mask(jnp.ones((2, 16), jnp.int32))

  def loss(p, c):
    out = M.Transformer(c).apply({"params": p}, tokens, pos, mask)
    return jnp.mean(out.logits_BTV**2) + jnp.mean(out.cls_logit_B**2)

  ref_val, ref_grad = jax.value_and_grad(loss)(params, cfg)
  for policy in sorted(set(M.REMAT_POLICIES) - {"none"}):
    val, grad = jax.value_and_grad(loss)(params, cfg.replace(remat_policy=policy))
    np.testing.assert_allclose(val, ref_val, rtol=1e-6, err_msg=policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, err_msg=policy), grad, ref_grad)


def _random_biases(params, seed=0):
  """q/k/v biases (zero at init) drawn at random, so a test of a biased family exercises them."""
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
    lambda path, x: rng.normal(0, 0.5, x.shape).astype(x.dtype) if str(path[-1].key).endswith("_bias") else x, params
  )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cls_row_is_an_input_embedding_only(family):
  cfg = M.ModelConfig(
    vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, family=family
  )
  params = _random_biases(M.init_params(cfg, jax.random.key(0)))
  assert ("q_bias" in params["layers_0"]["attn"]) == (family == "qwen2")
  np.testing.assert_allclose(params["cls_embedding"], params["embedding"].mean(axis=0), rtol=1e-6)
  tokens = jnp.array([[cfg.cls_id, 1, 5, 7, 9]])
  pos = jnp.arange(5)[None]
  mask = masks.causal_mask(jnp.ones((1, 5), jnp.int32))
  out = M.Transformer(cfg).apply({"params": params}, tokens, pos, mask)
  assert out.logits_BTV.shape == (1, 5, cfg.vocab_size)  # LM head over the base vocab: [CLS] can't be sampled
  assert out.cls_logit_B.shape == (1,)
  moved = dict(params, cls_embedding=params["cls_embedding"] + 1.0)
  out2 = M.Transformer(cfg).apply({"params": moved}, tokens, pos, mask)
  assert np.abs(np.asarray(out2.cls_logit_B - out.cls_logit_B)).max() > 1e-4
  # With a causal mask token 0 is the CLS; row 1.. see it, so logits move as well.
  assert np.abs(np.asarray(out2.logits_BTV[:, 1:] - out.logits_BTV[:, 1:])).max() > 1e-4


LM_ROWS_CASES = [(False, False, "llama"), (True, True, "llama"), (True, False, "qwen2")]


@pytest.mark.parametrize(
  "tied,scan,family",
  LM_ROWS_CASES,
  ids=[f"{'tied' if t else 'untied'}-{'scan' if s else 'loop'}-{f}" for t, s, f in LM_ROWS_CASES],
)
def test_lm_rows_compute_only_the_chosen_rows(tied, scan, family):
  # The decode loop asks for LM logits of one row per sequence (the last prompt row; the token
  # row of a CLS step): those rows, the CLS logit and the cache must be what the all-rows call gives.
  cfg = M.ModelConfig(
    vocab_size=97,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=48,
    tie_embeddings=tied,
    scan_layers=scan,
    family=family,
  )
  params = _random_biases(M.init_params(cfg, jax.random.key(0)))
  B, T, S = 3, 7, 12
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size).at[:, 0].set(cfg.cls_id)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = jnp.pad(masks.causal_mask(jnp.ones((B, T), jnp.int32)), ((0, 0), (0, 0), (0, S - T)))
  slots = jnp.broadcast_to(jnp.arange(T), (B, T))
  apply = lambda **kw: M.Transformer(cfg).apply(
    {"params": params}, tokens, pos, mask, cache=M.init_cache(cfg, B, S), slots_BT=slots, cls_row=0, **kw
  )
  full = apply()
  rows_BK = jnp.asarray([[6, 1], [3, 3], [0, 5]], jnp.int32)
  some = apply(lm_rows_BK=rows_BK)
  assert some.logits_BTV.shape == (B, 2, cfg.vocab_size)
  want = np.take_along_axis(np.asarray(full.logits_BTV), np.asarray(rows_BK)[..., None], axis=1)
  # Fewer rows may pick another matmul kernel: equal to float rounding, not necessarily bitwise.
  np.testing.assert_allclose(some.logits_BTV, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(some.cls_logit_B, full.cls_logit_B)
  jax.tree.map(np.testing.assert_array_equal, some.cache, full.cache)


def _attention_brute_force(q_BTGRH, k_BGSH, v_BGSH, mask_BTS):
  """Softmax attention cell by cell in float64 numpy; a row with nothing allowed is 0."""
  q, k, v, mask = (np.asarray(a, np.float64) for a in (q_BTGRH, k_BGSH, v_BGSH, mask_BTS))
  B, T, G, R, H = q.shape
  out = np.zeros_like(q)
  for b, t, g, r in np.ndindex(B, T, G, R):
    allowed = np.flatnonzero(mask[b, t])
    if allowed.size:
      s = k[b, g, allowed] @ q[b, t, g, r] / np.sqrt(H)
      p = np.exp(s - s.max())
      out[b, t, g, r] = (p / p.sum()) @ v[b, g, allowed]
  return out


def test_blocked_attention_matches_brute_force():
  rng = np.random.default_rng(0)
  B, T, S, G, R, H = 2, 70, 83, 2, 2, 8
  q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((B, T, G, R, H), (B, G, S, H), (B, G, S, H)))
  rows, slots = np.arange(T)[:, None], np.arange(S)[None, :]
  mask = (slots <= rows + 3) & (rows - slots < 40)  # causal-ish with a sliding window: blocks skipped at both ends
  mask = np.broadcast_to(mask, (B, T, S)).copy()
  mask[0, 0, :] = slots[0] < 60  # a CLS-like row reading far ahead of its own block
  mask[1, 5, :] = False  # a padding row
  mask[1, 30:34, 16:32] = False  # a whole key block absent from some rows
  out = M.blocked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), block=16)
  assert out.shape == (B, T, G, R, H)
  np.testing.assert_allclose(np.asarray(out), _attention_brute_force(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_long_cached_forward_takes_the_blocked_path_with_the_same_values(monkeypatch, scan):
  # A cached forward of more than 2 blocks of rows (the decode loop's prompt pass) goes through
  # blocked_attention; its logits, CLS logit and cache must be the dense path's.
  cfg = M.ModelConfig(
    vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, scan_layers=scan
  )
  params = M.init_params(cfg, jax.random.key(0))
  B, T, S = 2, 40, 47
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size).at[:, 0].set(cfg.cls_id)
  span = jnp.asarray([[2, 30], [2, 21]], jnp.int32)
  input_len = jnp.asarray([T, 33], jnp.int32)
  mask = masks.prefill_mask(input_len, input_len - 5, span, T, S)
  slots = jnp.where(jnp.arange(T)[None] < input_len[:, None], jnp.arange(T)[None], S)

  def run():
    return M.Transformer(cfg).apply(
      {"params": params},
      tokens,
      jnp.broadcast_to(jnp.arange(T), (B, T)),
      mask,
      cache=M.init_cache(cfg, B, S),
      slots_BT=slots,
      cls_row=0,
      lm_rows_BK=(input_len - 1)[:, None],
    )

  calls = []
  blocked = M.blocked_attention
  monkeypatch.setattr(M, "blocked_attention", lambda *a: calls.append(a[-1]) or blocked(*a))
  monkeypatch.setattr(M, "ATTENTION_BLOCK", 8)
  got = run()
  assert calls and set(calls) == {8}  # traced once per layer (once in all under scan)
  n_calls = len(calls)
  monkeypatch.setattr(M, "ATTENTION_BLOCK", T)  # T <= 2 blocks: the dense path
  want = run()
  assert len(calls) == n_calls
  np.testing.assert_allclose(got.logits_BTV, want.logits_BTV, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.cls_logit_B, want.cls_logit_B, rtol=1e-5, atol=1e-5)
  for g, w in zip(got.cache, want.cache):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_pretrain_mask_leaves_lm_logits_unchanged(tmp_path, record_figure):
  m = _tiny_hf("llama_gqa")
  cfg, params = _import(m, tmp_path)
  rs = np.random.RandomState(0)
  params = dict(
    params,
    cls_embedding=rs.normal(size=cfg.d_model).astype(np.float32),
    cls_head={"kernel": rs.normal(size=(cfg.d_model, 1)).astype(np.float32), "bias": np.zeros(1, np.float32)},
  )
  T = 64
  tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, T))
  seg = np.ones((2, T), np.int32)
  seg[1, 50:] = 0
  plain = _forward(cfg, params, tokens, seg)

  with_cls = np.concatenate([np.full((2, 1), cfg.cls_id), tokens], axis=1)
  seg_cls = np.concatenate([np.ones((2, 1), np.int32), seg], axis=1)
  mask = masks.cls_training_mask(jnp.asarray(seg_cls), mode="pretrain")
  pos = jnp.broadcast_to(jnp.arange(T + 1), (2, T + 1))
  out = M.Transformer(cfg).apply({"params": params}, jnp.asarray(with_cls), pos, mask)
  keep = seg.astype(bool)
  err = np.abs(np.asarray(out.logits_BTV)[:, 1:][keep] - plain[keep]).max()
  record_figure("pretrain mask: max|dlogits| with vs without CLS", err)
  assert err <= 1e-5
  # The CLS itself did read the sequence: its logit depends on the tokens.
  other = with_cls.copy()
  other[:, 5] = (other[:, 5] + 1) % cfg.vocab_size
  out2 = M.Transformer(cfg).apply({"params": params}, jnp.asarray(other), pos, mask)
  assert np.abs(np.asarray(out2.cls_logit_B - out.cls_logit_B)).max() > 0


def test_preset_parameter_counts():
  names = ("llama2_7b", "smollm2_135m", "llama3_8b", "llama3_2_1b", "qwen2_5_0_5b")
  counts = {name: M.count_params(M.abstract_params(M.preset(name))) for name in names}
  extras = lambda d: d + d + 1  # CLS embedding row + Dense(1) head
  assert counts["llama2_7b"] == 6_738_415_616 + extras(4096)
  assert counts["smollm2_135m"] == 134_515_008 + extras(576)
  # The published totals of Llama-3.1-8B and Llama-3.2-1B (tied).
  assert counts["llama3_8b"] == 8_030_261_248 + extras(4096)
  assert counts["llama3_2_1b"] == 1_235_814_400 + extras(2048)
  # Qwen2.5-0.5B's published total (tied, q/k/v biases included).
  assert counts["qwen2_5_0_5b"] == 494_032_768 + extras(896)


def test_bf16_compute_tracks_fp32():
  cfg = M.ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96)
  params = M.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 24), 0, cfg.vocab_size)
  pos = jnp.arange(24)[None]
  mask = masks.causal_mask(jnp.ones((1, 24), jnp.int32))
  ref = M.Transformer(cfg).apply({"params": params}, tokens, pos, mask).logits_BTV
  low = (
    M.Transformer(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"))
    .apply({"params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)}, tokens, pos, mask)
    .logits_BTV
  )
  assert low.dtype == jnp.float32
  assert np.abs(np.asarray(low - ref)).max() < 0.05 * np.abs(np.asarray(ref)).max()


@pytest.fixture(scope="module")
def smollm2():
  path = G.smollm2_gguf_path()
  cfg, params = G.load_gguf(path)
  directory, fname = os.path.split(path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname, dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=fname)
  return cfg, params, hf_model.eval(), tok


def test_smollm2_gguf_matches_transformers(smollm2, record_figure):
  cfg, params, hf_model, tok = smollm2
  text = tok.apply_chat_template(
    [{"role": "user", "content": "Explain why the sky is blue."}], tokenize=False, add_generation_prompt=True
  )
  prompt = tok(text, return_tensors="np")["input_ids"][0]
  n_new, P = 20, len(prompt)
  with torch.no_grad():
    ref_logits = hf_model(torch.tensor(prompt[None])).logits.numpy()[0]
    ref_seq = hf_model.generate(torch.tensor(prompt[None]), max_new_tokens=n_new, do_sample=False)[0, P:].numpy()
  assert len(ref_seq) == n_new and cfg.eos_id not in ref_seq

  # Greedy without a cache over a fixed-size buffer: one compiled shape for every step.
  T = P + n_new
  apply = jax.jit(
    lambda toks, seg: (
      M.Transformer(cfg)
      .apply({"params": params}, toks, jnp.arange(T)[None], masks.causal_mask(seg), cls_row=None)
      .logits_BTV
    )
  )
  buf = np.zeros((1, T), np.int32)
  buf[0, :P] = prompt
  ours_prompt_logits = None
  for step in range(n_new):
    seg = (np.arange(T) < P + step).astype(np.int32)[None]
    logits = np.asarray(apply(jnp.asarray(buf), jnp.asarray(seg)))[0]
    if step == 0:
      ours_prompt_logits = logits[:P]
    buf[0, P + step] = int(np.argmax(logits[P + step - 1]))
  err = np.abs(ours_prompt_logits - ref_logits).max()
  record_figure(f"max|dlogits| SmolLM2-135M GGUF chat prompt ({P} tokens)", err)
  record_figure("SmolLM2 greedy 20 tokens", tok.decode(buf[0, P:]).replace("\n", "\\n"))
  assert err <= 1e-3
  np.testing.assert_array_equal(buf[0, P:], ref_seq)


def test_gguf_qk_rows_match_transformers_dequantisation(smollm2):
  cfg, params, hf_model, _ = smollm2
  assert cfg == M.preset("smollm2_135m")  # GGUF float32 metadata reads back as the preset's decimals
  sd = hf_model.state_dict()
  for i in (0, cfg.n_layers - 1):
    for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj")):
      w = sd[f"model.layers.{i}.self_attn.{theirs}.weight"].numpy()
      np.testing.assert_array_equal(
        params[f"layers_{i}"]["attn"][ours], w.T.reshape(params[f"layers_{i}"]["attn"][ours].shape)
      )


@pytest.mark.parametrize(
  "scan,family", [(False, "llama"), (True, "llama"), (True, "qwen2")], ids=["loop", "scan", "scan-qwen2"]
)
def test_every_parameter_has_logical_axes(scan, family):
  import flax.linen as nn

  cfg = M.ModelConfig(
    vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, scan_layers=scan, family=family
  )
  boxed = M.abstract_params(cfg)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]
  assert leaves and all(is_box(x) for _, x in leaves)
  for path, leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim, path
    in_stack = scan and path[0].key == "layers"
    assert (leaf.names[0] == "layers") == in_stack, path
  names = {n for _, leaf in leaves for n in leaf.names}
  assert {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "norm"} <= names
