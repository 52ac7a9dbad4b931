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
