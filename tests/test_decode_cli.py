"""`python -m clsalign_jax.generate` end to end, on a tiny random model exported with save_hf
next to the real SmolLM2 tokenizer."""

import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from clsalign_jax import model as M
from clsalign_jax.data.tokenizer import Tokenizer, smollm2_gguf_path
from clsalign_jax.decode import PAPER_REFUSAL
from clsalign_jax.generate import load_checkpoint
from clsalign_jax.interop.hf import save_hf


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  tokenizer = Tokenizer.from_gguf(smollm2_gguf_path())
  cfg = M.ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                      head_dim=8, d_ff=32, tie_embeddings=True, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
  rng = np.random.default_rng(0)
  shapes, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(M.abstract_params(cfg)))
  params = jax.tree.unflatten(treedef, [
      np.ones(x.shape, np.float32) if jax.tree_util.keystr(path).endswith("['weight']")
      else rng.normal(0.0, 0.02, x.shape).astype(np.float32) for path, x in shapes])
  params["cls_head"]["bias"] = np.full((1,), 5.0, np.float32)  # every prompt reads as malicious
  directory = tmp_path_factory.mktemp("tiny_hf")
  save_hf(str(directory), cfg, params, tokenizer)
  return str(directory)


def test_cli_prints_response_trace_and_insertion(tiny_dir):
  cmd = [sys.executable, "-m", "clsalign_jax.generate", f"--checkpoint={tiny_dir}", "--prompt=How are you?",
         "--prefill= Sure, here is", "--max_new_tokens=14", "--schedule=every"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "prompt-time p(malicious) = 0.99" in text and "(malicious)" in text
  assert f"response: ' Sure, here is{PAPER_REFUSAL}" in text or f"response: ' Sure, here is {PAPER_REFUSAL}" in text
  assert "CLS trace (step:p, " in text
  assert "refusal prefix: inserted at response token 4" in text and "initially malicious" in text


def test_load_checkpoint_rejects_unknown_specs(tmp_path):
  with pytest.raises(ValueError, match="expected 'smollm2'"):
    load_checkpoint(str(tmp_path))
