"""Writes docs/configuration.md from `default_config()` and every `configs/*.py`.

    python scripts/gen_config_docs.py            # rewrite docs/configuration.md
    python scripts/gen_config_docs.py --check    # exit 1 if the committed file is stale

Defaults and types come from the live ConfigDicts; meanings come from the comments written next
to each assignment (the comment block right above it, plus a trailing comment), so a key only
needs its comment in `clsalign_jax/config.py` (or in the preset file) to be documented. The
architecture fields under `model.*` are created in a loop; their meanings come from comments on
`ModelConfig` in `clsalign_jax/model.py`, or from `_MODEL_FIELDS` below where it has none.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import io
import pathlib
import sys
import tokenize

from ml_collections import config_dict

from clsalign_jax import config as config_lib
from clsalign_jax import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configuration.md"
CONFIGS = ROOT / "configs"

_MODEL_FIELDS = {
  "preset": "a name in `model.PRESETS`; unset: every field below is given explicitly",
  "vocab_size": "base vocabulary V; `[CLS]` is input-embedding row V and is never generated",
  "d_model": "hidden width D",
  "n_layers": "decoder layers",
  "n_heads": "query heads",
  "n_kv_heads": "key/value heads (GQA when fewer than `n_heads`)",
  "head_dim": "width of one attention head",
  "d_ff": "SwiGLU hidden width",
  "rms_eps": "RMSNorm epsilon",
  "rope_theta": "RoPE base frequency",
  "rope_factor": "RoPE scaling factor (`linear`, `dynamic`, `llama3`)",
  "max_seq_len": "longest sequence the model accepts (`data.seq_len` must not exceed it)",
  "sliding_window": "attention window in tokens (Mistral v0.1); 0 = none",
  "tie_embeddings": "the LM head reuses the input embedding (SmolLM2)",
  "bos_id": "beginning-of-sequence token id",
  "eos_id": "end-of-sequence token id",
  "dtype": "compute dtype of activations and matmuls",
  "param_dtype": "dtype the parameters are stored and updated in",
  "scan_layers": "run the layers with `nn.scan` (one compiled layer; params stacked on a `layers` axis)",
  "remat_policy": "activation rematerialisation: " + ", ".join(f"`{p}`" for p in model_lib.REMAT_POLICIES),
}
# Meanings of the keys that have no comment in clsalign_jax/config.py yet. A comment there wins,
# and the generator then refuses to run until the entry here is removed, so the two never disagree.
_UNCOMMENTED = {
  "seed": "PRNG seed of parameter init and the training key; also seeds the synthetic data and the data pipeline's order",
  "data.seq_len": "tokens per row (CLS included); rows may be shorter, each new length compiles once",
  "data.eval_split": "split the periodic evaluation reads",
  "train.num_epochs": "epochs when `train.num_steps < 0`",
  "loss.cls_threshold": "p(malicious) above this counts as malicious in the accuracy / precision / recall / F1 metrics",
  "optimizer.learning_rate": "AdamW peak learning rate",
  "optimizer.b1": "AdamW β1",
  "optimizer.b2": "AdamW β2",
  "optimizer.eps": "AdamW ε",
  "optimizer.weight_decay": "AdamW decoupled weight decay",
  "schedule.warmup_steps": "linear warm-up from 0 to the peak learning rate",
  "mesh.data": "size of the `data` mesh axis (pure data parallelism: params replicated)",
  "mesh.tensor": "size of the `tensor` mesh axis (heads, MLP and vocabulary split)",
  "checkpoint.every_steps": "save cadence in steps; the last step is always saved",
  "checkpoint.async_save": "write checkpoints in the background while training goes on",
  "eval.num_batches": "global batches per evaluation",
  "metrics.progress_bar": "show a tqdm progress bar (steps, ETA, loss, CLS accuracy)",
  "after_training.max_new_tokens": "generated tokens per response in the evaluation",
  "after_training.template": "chat template of the evaluation prompts: `chatml`, `llama2` or `mistral`",
  "after_training.benign": "benign benchmark spec (eval/benchmarks.py load_benchmark) for the over-refusal rate",
  "after_training.cls_test_prompts": "a JSONL of prompt/label rows for the CLS metrics instead of the test split; "
  "'' = the test split",
}
# Keys whose defaults embed this checkout's absolute path (eval fixtures) print it as <repo>.
_REPO_MARK = "<repo>"


class DocError(ValueError):
  pass


# ----- comments next to assignments ---------------------------------------------------------------


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
  """{line: comment text} and the set of lines that hold nothing but a comment."""
  text, alone = {}, set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      line = tok.start[0]
      text[line] = tok.string[1:].rstrip()
      if not tok.line[: tok.start[1]].strip():
        alone.add(line)
  return text, alone


def _describe(node: ast.AST, comments: dict[int, str], alone: set[int]) -> str:
  """The comment block directly above `node` and any trailing comment on its lines."""
  above = []
  line = node.lineno - 1
  while line in alone:
    above.insert(0, comments[line])
    line -= 1
  trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n not in alone]
  return _join(above + trailing)


def _join(lines: list[str]) -> str:
  """Comment lines as one table cell: a line indented past the first is a list item of its own."""
  parts = []
  for raw in lines:
    body = raw[1:] if raw.startswith(" ") else raw
    if parts and body.startswith(" "):
      parts.append("<br>" + body.strip())
    else:
      parts.append((" " if parts else "") + body.strip())
  return "".join(parts).replace("|", "\\|")


def _key_path(node: ast.AST, root: str) -> str | None:
  """'a.b' for `root.a.b`, None for anything else (subscripts, other names)."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.insert(0, node.attr)
    node = node.value
  return ".".join(parts) if isinstance(node, ast.Name) and node.id == root and parts else None


@dataclasses.dataclass
class _Parsed:
  meaning: dict[str, str]  # key or section → description
  order: dict[str, int]  # key or section → source line, for listing in source order
  # Keys assigned a whole dict literal that nothing else writes into (a benchmark spec, say): one
  # row with the dict as its value rather than a row per field.
  whole_dicts: set[str]


def parse_config_source(path: pathlib.Path, function: str) -> _Parsed:
  """Descriptions of every `c.<key> = ...` and `c.<section>.update(k=...)` in `function`."""
  source = path.read_text()
  comments, alone = _comments(source)
  tree = ast.parse(source)
  module_meaning = {
    t.id: _describe(node, comments, alone)
    for node in tree.body
    if isinstance(node, ast.Assign)
    for t in node.targets
    if isinstance(t, ast.Name)
  }
  func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
  root = next(n.targets[0].id for n in func.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name))
  parsed = _Parsed({}, {}, set())
  written_into = set()
  for node in ast.walk(func):
    if isinstance(node, ast.Assign):
      key = _key_path(node.targets[0], root)
      if key is None:
        continue
      meaning = _describe(node, comments, alone)
      if not meaning and isinstance(node.value, ast.Name):
        meaning = module_meaning.get(node.value.id, "")
      parsed.meaning[key] = meaning
      parsed.order.setdefault(key, node.lineno)
      if _is_dict_literal(node.value):
        parsed.whole_dicts.add(key)
      written_into.add(key.rpartition(".")[0])
    elif isinstance(node, ast.Subscript):
      written_into.add(_key_path(node.value, root))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
      call = node.value
      section = _key_path(call.func.value, root) if isinstance(call.func, ast.Attribute) else None
      if section is None or call.func.attr != "update":
        continue
      written_into.add(section)
      meaning = _describe(node, comments, alone)
      for kw in call.keywords:
        key = f"{section}.{kw.arg}"
        if meaning:
          parsed.meaning[key] = meaning
        parsed.order.setdefault(key, node.lineno)
  parsed.whole_dicts -= written_into
  return parsed


def _is_dict_literal(node: ast.AST) -> bool:
  """`{...}`, `dict(...)` or `ConfigDict(<one of those>)`, non-empty."""
  if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
    name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
    if name == "ConfigDict" and node.args:
      return _is_dict_literal(node.args[0])
    return name == "dict" and bool(node.keywords)
  return isinstance(node, ast.Dict) and bool(node.keys)


def model_field_meanings() -> dict[str, str]:
  """Comments on ModelConfig's fields, falling back to `_MODEL_FIELDS`."""
  path = pathlib.Path(model_lib.__file__)
  source = path.read_text()
  comments, alone = _comments(source)
  cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "ModelConfig")
  found = {n.target.id: _describe(n, comments, alone) for n in cls.body if isinstance(n, ast.AnnAssign)}
  return {"preset": _MODEL_FIELDS["preset"], **{name: found.get(name) or _MODEL_FIELDS.get(name, "") for name in found}}


# ----- values ----------------------------------------------------------------------------------------


def flatten(cfg, whole: set[str] = frozenset(), prefix: str = "") -> dict[str, object]:
  """{dotted key: value}, keeping the keys in `whole` as one dict value each."""
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, (config_dict.ConfigDict, dict)) and name not in whole:
      out.update(flatten(value, whole, name + "."))
    else:
      out[name] = value.to_dict() if isinstance(value, config_dict.ConfigDict) else value
  return out


def _types(cfg, whole: set[str], prefix: str = "") -> dict[str, str]:
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, config_dict.ConfigDict) and name not in whole:
      out.update(_types(value, whole, name + "."))
    else:
      out[name] = "dict" if isinstance(value, config_dict.ConfigDict) else cfg.get_type(key).__name__
  return out


def show(value, split: bool = True) -> str:
  """A value as markdown code; a long sequence one item per line."""
  if isinstance(value, config_dict.ConfigDict):
    value = value.to_dict()
  text = repr(value).replace(str(ROOT), _REPO_MARK)
  if split and isinstance(value, (list, tuple)) and value and len(text) > 60:
    return "<br>".join(show(v, split=False) for v in value)
  return f"`{text}`".replace("|", "\\|")


def load_preset(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"_config_doc_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # a preset may define dataclasses, which look their module up
  spec.loader.exec_module(module)
  return module, module.get_config()


# ----- the page ------------------------------------------------------------------------------------


def _section_of(key: str) -> str:
  return key.partition(".")[0] if "." in key else ""


def default_tables() -> list[str]:
  cfg = config_lib.default_config()
  parsed = parse_config_source(pathlib.Path(config_lib.__file__), "default_config")
  values, types = flatten(cfg, parsed.whole_dicts), _types(cfg, parsed.whole_dicts)
  model_meaning = model_field_meanings()
  model_defaults = {f.name: f.default for f in dataclasses.fields(model_lib.ModelConfig)}
  model_order = {name: i for i, name in enumerate(model_meaning)}

  rows: dict[str, list[tuple[tuple, str]]] = {}
  missing = []
  for key, value in values.items():
    section, field = _section_of(key), key.partition(".")[2]
    if section == "model":
      meaning = model_meaning.get(field, "")
      if key in parsed.meaning and parsed.meaning[key]:
        meaning = parsed.meaning[key]
      order = (parsed.order["model"], model_order.get(field, len(model_order)))
      shown = show(value)
      if value is None and field != "preset":
        fallback = model_defaults[field]
        shown = "unset: the preset's value" + (
          "" if fallback is dataclasses.MISSING else f" (without a preset {show(fallback)})"
        )
    else:
      meaning = parsed.meaning.get(key, "")
      if meaning and key in _UNCOMMENTED:
        raise DocError(
          f"config.{key} now has a comment in clsalign_jax/config.py: "
          f"remove its entry from _UNCOMMENTED in {pathlib.Path(__file__).name}"
        )
      meaning = meaning or _UNCOMMENTED.get(key, "")
      order = (parsed.order.get(section or key, 0), parsed.order.get(key, 0))
      shown = show(value)
    if not meaning:
      missing.append(key)
    rows.setdefault(section, []).append((order, f"| `{key}` | {types[key]} | {shown} | {meaning} |"))
  stale = set(_UNCOMMENTED) - set(values)
  if stale:
    raise DocError(f"_UNCOMMENTED names keys default_config() no longer has: {sorted(stale)}")
  if missing:
    raise DocError(
      f"config keys without a description: {missing}. Add a comment above the assignment in "
      "clsalign_jax/config.py (or on the ModelConfig field in clsalign_jax/model.py)."
    )

  out = []
  sections = sorted(rows, key=lambda s: min(o for o, _ in rows[s]))
  for section in sections:
    out.append(f"### `{section}`" if section else "### top level")
    intro = parsed.meaning.get(section, "") if section else ""
    if intro:
      out += ["", intro.replace("<br>", "\n")]
    out += ["", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    out += [row for _, row in sorted(rows[section])]
    out.append("")
  return out


def preset_sections() -> list[str]:
  whole = parse_config_source(pathlib.Path(config_lib.__file__), "default_config").whole_dicts
  defaults = flatten(config_lib.default_config(), whole)
  training, evaluation = [], []
  for path in sorted(CONFIGS.glob("*.py")):
    module, cfg = load_preset(path)
    doc = (module.__doc__ or "").strip()
    values = flatten(cfg, whole)
    rel = path.relative_to(ROOT).as_posix()
    if values.keys() == defaults.keys():
      summary = doc.split("\n\n")[0].replace("\n", " ")
      training += [f"### `{rel}`", "", summary, "", "| key | default | this preset |", "| --- | --- | --- |"]
      training += [f"| `{k}` | {show(defaults[k])} | {show(v)} |" for k, v in values.items() if v != defaults[k]]
      training.append("")
    else:
      parsed = parse_config_source(path, "get_config")
      evaluation += [f"### `{rel}`", "", "```", doc, "```", "", "| key | value | meaning |", "| --- | --- | --- |"]
      for key, value in values.items():
        meaning = parsed.meaning.get(key) or parsed.meaning.get(_section_of(key), "")
        evaluation.append(f"| `{key}` | {show(value)} | {meaning} |")
      evaluation.append("")
  return (
    ["## Training presets", "", "Each file starts from `default_config()` and changes only the keys listed.", ""]
    + training
    + [
      "## Evaluation configs",
      "",
      "Read by `python -m clsalign_jax.evaluate`; they do not derive from `default_config()`. "
      "Values are shown as `get_config()` returns them with no argument; the sections are described in "
      "each file's docstring and in `clsalign_jax/eval/harness.py`.",
      "",
    ]
    + evaluation
  )


def render() -> str:
  lines = [
    "<!-- Generated by scripts/gen_config_docs.py from clsalign_jax/config.py and configs/*.py. "
    "Do not edit; run `python scripts/gen_config_docs.py`. -->",
    "",
    "# Configuration reference",
    "",
    "Every training run is `python -m clsalign_jax.main --config=configs/<preset>.py --workdir=DIR "
    "[--config.<key>=<value> ...]`. All defaults live in `default_config()` "
    "(`clsalign_jax/config.py`), which returns a *locked* ConfigDict: a key that is not listed "
    "here fails, in a preset file and on the command line alike. A command-line value must have the "
    "key's type. A test regenerates this page and fails when it is out of date.",
    "",
    "## Training keys (`default_config()`)",
    "",
  ]
  lines += default_tables()
  lines += preset_sections()
  return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true", help="fail if docs/configuration.md is out of date")
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    if not OUTPUT.exists() or OUTPUT.read_text() != text:
      print(f"{OUTPUT.relative_to(ROOT)} is out of date: run python scripts/gen_config_docs.py", file=sys.stderr)
      return 1
    return 0
  OUTPUT.write_text(text)
  print(f"wrote {OUTPUT.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
