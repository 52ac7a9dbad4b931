"""`python -m clsalign_jax.convert` end to end: orbax round trip, a bad source, the SmolLM2 export
read back by transformers (tokenizer, chat template, logits)."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from clsalign_jax import masks
from clsalign_jax import model as M
from clsalign_jax.interop import gguf as G
from clsalign_jax.interop import hf
from test_interop_hf import CONFIGS, _random_params, _tree_equal


def test_convert_cli_orbax_round_trip_and_bad_source(tmp_path):
  cfg = CONFIGS["llama_tied"]
  params = _random_params(cfg, seed=5)
  hf.save_hf(str(tmp_path / "hf"), cfg, params)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", "clsalign_jax.convert", *args], capture_output=True, text=True, env=env, timeout=300
  )
  out = run(f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'orbax'}", "--dst_format=orbax", "--tokenizer=none")
  assert out.returncode == 0, out.stderr
  back = run(f"--src={tmp_path / 'orbax'}", f"--dst={tmp_path / 'hf2'}", "--tokenizer=none")
  assert back.returncode == 0, back.stderr
  cfg2, params2 = hf.load_hf(str(tmp_path / "hf2"))
  assert cfg2 == cfg
  _tree_equal(params2, params)
  bad = run(f"--src={tmp_path / 'nowhere'}", f"--dst={tmp_path / 'x'}")
  assert bad.returncode == 1 and "nowhere: not found" in bad.stderr


def test_smollm2_export_with_tokenizer_loads_in_transformers(tmp_path, record_figure):
  from clsalign_jax.data.tokenizer import Tokenizer

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-m", "clsalign_jax.convert", "--src=smollm2", f"--dst={tmp_path}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ours_tok = Tokenizer.from_gguf(G.smollm2_gguf_path())
  assert tok.convert_tokens_to_ids("[CLS]") == 49152 == ours_tok.cls_id
  text = "How do I bake bread? 🍞 面包, quickly.\n  Indented line."
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert ids == ours_tok.encode(text)
  # The chat template is ours (chatml, as SmolLM2 is used here): the same ids as our encoding.
  from clsalign_jax.data.templates import encode_prompt, get_template

  chat = tok.apply_chat_template(
    [{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True, tokenize=True
  )
  chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
  assert chat == encode_prompt(ours_tok, get_template("chatml"), "How do I bake bread?").tokens[1:].tolist()
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  assert model.get_input_embeddings().weight.shape[0] == 49152  # HF sees the base vocab only
  cfg, params = hf.load_hf(str(tmp_path))
  with torch.no_grad():
    ref = model(torch.tensor([ids])).logits.numpy()
  T = len(ids)
  ours = M.Transformer(cfg).apply(
    {"params": params},
    jnp.asarray([ids]),
    jnp.arange(T)[None],
    masks.causal_mask(jnp.ones((1, T), jnp.int32)),
    cls_row=None,
  )
  err = np.abs(np.asarray(ours.logits_BTV) - ref).max()
  record_figure("SmolLM2 export -> transformers max|dlogits|", err)
  # Real logits reach ~30 over 30 layers; fp32 reassociation alone gives ~1e-4 here (tiny configs: 1e-4).
  assert err <= 1e-3
  _, gguf_params = G.load_gguf(G.smollm2_gguf_path())
  _tree_equal(params, gguf_params)
