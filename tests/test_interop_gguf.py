"""GGUF import (interop/gguf.py): what it refuses by name, and llama.cpp's row order undone."""

import gguf
import numpy as np
import pytest

from clsalign_jax.errors import CheckpointError
from clsalign_jax.interop import gguf as G


def test_gguf_of_another_architecture(tmp_path):
  path = str(tmp_path / "gpt2.gguf")
  writer = gguf.GGUFWriter(path, "gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(CheckpointError, match="GGUF architecture 'gpt2' is not supported"):
    G.load_gguf(path)
  with pytest.raises(CheckpointError, match="file not found"):
    G.load_gguf(str(tmp_path / "absent.gguf"))
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
  with pytest.raises(CheckpointError, match="not a readable GGUF"):
    G.load_gguf(str(tmp_path / "junk.gguf"))


def test_unpermute_inverts_llama_cpp_order():
  n_heads, head_dim, d_in = 3, 8, 5
  w = np.arange(n_heads * head_dim * d_in, dtype=np.float32).reshape(n_heads * head_dim, d_in)
  # llama.cpp's convert script: per head, rows (first half, second half) become interleaved pairs.
  permuted = w.reshape(n_heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(G.unpermute_rows(permuted, n_heads), w)


# ----- Qwen2: GGUF architecture "qwen2", laid out as llama.cpp's converter writes it ----------------


def _tiny_qwen2(tied: bool):
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=tied,
  )
  m = transformers.Qwen2ForCausalLM(cfg)
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.5)
  return m.eval()


def _write_qwen2_gguf(path, model):
  """llama.cpp keeps Qwen2's Q/K rows in HF order (NeoX RoPE) and writes the q/k/v biases as
  `blk.N.attn_{q,k,v}.bias`; a tied model has no `output.weight`."""
  cfg = model.config
  w = gguf.GGUFWriter(str(path), "qwen2")
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(1e6)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_bos_token_id(5)
  w.add_eos_token_id(6)
  top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
  layer = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
  }
  for name, t in model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    base, kind = name.rsplit(".", 1)
    if base.startswith("model.layers."):
      _, _, i, rest = base.split(".", 3)
      gname = f"blk.{i}.{layer[rest]}.{kind}"
    else:
      gname = f"{top[base]}.{kind}"
    w.add_tensor(gname, t.detach().numpy().astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_gguf_matches_transformers(tied, tmp_path, record_figure):
  import jax.numpy as jnp
  import torch
  import transformers

  from clsalign_jax import masks
  from clsalign_jax import model as M

  hf_model = _tiny_qwen2(tied)
  path = _write_qwen2_gguf(tmp_path / "qwen2.gguf", hf_model)
  # transformers' own reader of llama.cpp files gets the original weights back: the layout above
  # is the one a real qwen2 GGUF has, not just one our reader agrees with.
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="qwen2.gguf", dtype=torch.float32)
  want, got = hf_model.state_dict(), theirs.state_dict()
  assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
  cfg, params = G.load_gguf(path)
  assert cfg.family == "qwen2" and cfg.qkv_bias and cfg.tie_embeddings == tied
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rms_eps) == (4, 2, 16, 1e6, 1e-6)
  T = 48
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, T))
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens)).logits.numpy()
  out = M.Transformer(cfg).apply(
    {"params": params},
    jnp.asarray(tokens),
    jnp.arange(T)[None],
    masks.causal_mask(jnp.ones((1, T), jnp.int32)),
    cls_row=None,
  )
  err = np.abs(np.asarray(out.logits_BTV) - ref).max()
  record_figure(f"qwen2 GGUF ({'tied' if tied else 'untied'}) -> ours vs transformers max|dlogits|", err)
  assert err <= 1e-4


def test_qwen2_gguf_refusals(tmp_path):
  # llama3 per-frequency RoPE factors belong to the llama architecture; a qwen2 file carrying them
  # is refused by name rather than read with the wrong frequencies.
  hf_model = _tiny_qwen2(tied=True)
  path = tmp_path / "freqs.gguf"
  w = gguf.GGUFWriter(str(path), "qwen2")
  for key, value in (("block_count", 2), ("embedding_length", 64), ("feed_forward_length", 96)):
    w.add_uint32(f"qwen2.{key}", value)
  w.add_head_count(4)
  w.add_vocab_size(97)
  w.add_tensor("rope_freqs.weight", np.full(8, 2.0, np.float32))
  w.add_tensor("token_embd.weight", hf_model.model.embed_tokens.weight.detach().numpy())
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(CheckpointError, match="rope_freqs.weight' scales RoPE per frequency.*'qwen2'"):
    G.load_gguf(str(path))
