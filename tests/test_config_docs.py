"""Docs generated from code stay in step with it: the configuration reference is regenerated and
compared, and every dry-run block in the 7B guide is re-run and compared line by line."""

import importlib.util
import pathlib
import re
import shlex
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def test_configuration_reference_is_up_to_date():
  gen = _load(ROOT / "scripts" / "gen_config_docs.py", "gen_config_docs")
  committed = (ROOT / "docs" / "configuration.md").read_text()
  assert committed == gen.render(), "docs/configuration.md is stale: run python scripts/gen_config_docs.py"


def test_configuration_reference_covers_every_key_and_preset():
  from clsalign_jax.config import default_config

  gen = _load(ROOT / "scripts" / "gen_config_docs.py", "gen_config_docs")
  text = (ROOT / "docs" / "configuration.md").read_text()
  whole = gen.parse_config_source(ROOT / "clsalign_jax" / "config.py", "default_config").whole_dicts
  for key in gen.flatten(default_config(), whole):
    assert f"| `{key}` |" in text
  for preset in sorted((ROOT / "configs").glob("*.py")):
    assert f"### `configs/{preset.name}`" in text


def _set(config, key: str, text: str) -> None:
  *parents, leaf = key.split(".")
  for name in parents:
    config = config[name]
  config[leaf] = config.get_type(leaf)(text)


def test_dry_run_blocks_of_the_7b_guide_match_the_planner():
  from clsalign_jax import train

  guide = (ROOT / "docs" / "reproduce_7b.md").read_text()
  blocks = re.findall(r"^\$ (python -m clsalign_jax\.main .*)\n((?:(?!```).*\n)+)", guide, flags=re.M)
  assert len(blocks) >= 4
  for command, printed in blocks:
    flags = dict(arg[2:].split("=", 1) for arg in shlex.split(command)[3:] if "=" in arg)
    config = _load(ROOT / flags.pop("config"), "preset").get_config()
    devices = int(flags.pop("dry_run_devices"))
    for key, value in flags.items():
      _set(config, key.removeprefix("config."), value)
    assert printed.rstrip("\n") == train.dry_run(config, devices), command
