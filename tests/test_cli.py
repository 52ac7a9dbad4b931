"""`clsalign_jax.cli`: every command of the package runs under `cli.run` and answers --helpshort with
its flags; subcommands, one-line usage errors, and the `key=value` config argument parser."""

import importlib
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
from absl import flags

from clsalign_jax import cli, errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clsalign_jax"

# Every `python -m clsalign_jax...` command. A module with a `__main__` block must be listed here
# (test_every_command_is_listed), so a new command cannot skip the checks below.
COMMANDS = (
  "clsalign_jax.main",
  "clsalign_jax.evaluate",
  "clsalign_jax.generate",
  "clsalign_jax.convert",
  "clsalign_jax.after_training",
  "clsalign_jax.eval.results_table",
  "clsalign_jax.data.curation",
  "clsalign_jax.data.completions",
  "clsalign_jax.data.contrast",
  "clsalign_jax.serve",
)


def _source(command: str) -> pathlib.Path:
  """The file `python -m command` runs: the module, or a package's __main__.py."""
  path = ROOT / command.replace(".", "/")
  return path / "__main__.py" if path.is_dir() else path.with_suffix(".py")


def _module(command: str) -> str:
  return f"{command}.__main__" if (ROOT / command.replace(".", "/")).is_dir() else command


def _modules_with_a_main_block() -> set[str]:
  found = set()
  for path in PACKAGE.rglob("*.py"):
    if "shipped" in path.parts:
      continue
    if re.search(r"^if __name__ == .__main__.:", path.read_text(encoding="utf-8"), re.MULTILINE):
      parts = path.relative_to(ROOT).with_suffix("").parts
      found.add(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
  return found


def test_every_command_is_listed():
  assert _modules_with_a_main_block() == set(COMMANDS)
  # The installed console scripts run command modules (console.py), each of them listed.
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  console = (PACKAGE / "console.py").read_text()
  for target in scripts.values():
    function = target.split(":")[1]
    module = re.search(rf"def {function}\(\).*?_run\(\"([\w.]+)\"\)", console, re.DOTALL).group(1)
    assert module in COMMANDS, (target, module)


@pytest.mark.parametrize("module", COMMANDS)
def test_command_runs_under_cli_run_and_lists_its_flags_on_helpshort(module, capsys):
  source = _source(module).read_text()
  assert "cli.run(" in source and "cli.exit_with(main)" in source, module
  command = importlib.import_module(_module(module))
  assert command.main(["prog", "--helpshort"]) == 0
  out = capsys.readouterr().out
  fv = flags.FlagValues()
  command.define_flags(fv, ["prog"])
  names = [name for name in fv if len(name) > 1]  # absl adds one-letter aliases of its own for none
  assert names, module
  for name in [*names, "debug"]:
    assert f"--{name}:" in out or f"--[no]{name}:" in out, (module, name)


def test_python_m_entry_prints_the_help(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "clsalign_jax.after_training", "--helpshort"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "lm-leak --workdir=... --out=..." in result.stdout and "--batch_size:" in result.stdout


SUBCOMMANDS = {
  "fit": cli.Subcommand("fit it", ("data",), ("steps",)),
  "show": cli.Subcommand("show it", ("out",)),
}


def _define(fv, argv):
  for name in ("data", "out"):
    flags.DEFINE_string(name, None, name, flag_values=fv)
  flags.DEFINE_integer("steps", 3, "steps", flag_values=fv)


@pytest.mark.parametrize(
  "argv, code, needle",
  [
    (["fit", "--data=d", "--steps=5"], 0, ""),
    ([], 2, "error: expected one subcommand of fit, show; got none"),
    (["fit", "show", "--data=d"], 2, "got fit show"),
    (["fix", "--data=d"], 2, "got fix"),
    (["fit"], 2, "error: fit: --data required"),
    (["show", "--out=o", "--steps=2"], 2, "error: show does not read --steps"),
    (["fit", "--data=d", "--stpes=2"], 2, "error: Unknown command line flag 'stpes'"),
    (["fit", "--data=d", "--steps=many"], 2, "error: "),
  ],
)
def test_subcommand_errors_are_one_line_with_exit_code_2(argv, code, needle, capsys):
  seen = []
  body = lambda fv, args: seen.append((cli.subcommand(fv, args, SUBCOMMANDS), fv.steps))
  assert cli.run(body, _define, ["prog", *argv]) == code
  err = capsys.readouterr().err
  if code == 0:
    assert seen == [("fit", 5)] and err == ""
  else:
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_help_prints_the_usage_above_the_flags(capsys):
  usage = cli.subcommand_usage("pkg.tool", SUBCOMMANDS)
  assert cli.run(lambda fv, args: None, _define, ["prog", "--help"], usage=usage) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: python -m pkg.tool <subcommand>")
  assert "  fit --data=... [--steps=...]\n      fit it" in out and out.index("show it") < out.index("--steps:")


def test_failure_inside_a_command_is_one_line_with_exit_code_1(capsys):
  def body(fv, args):
    raise FileNotFoundError("/nowhere/x.json: not found")

  assert cli.run(body, _define, ["prog"]) == 1
  assert capsys.readouterr().err == "error: /nowhere/x.json: not found\n"
  assert cli.run(lambda fv, args: cli.no_arguments(args), _define, ["prog", "stray"]) == 2
  assert capsys.readouterr().err.startswith("error: unexpected arguments: ['stray']")


def test_config_args():
  known = ("cls", "sft", "size")
  assert cli.config_args(None, known) == {} and cli.config_args("", known) == {}
  assert cli.config_args("cls=/runs/a, sft = /runs/b,,size=", known) == {"cls": "/runs/a", "sft": "/runs/b", "size": ""}
  with pytest.raises(errors.UsageError, match=r"config argument 'cls': expected key=value"):
    cli.config_args("cls", known)
  with pytest.raises(errors.UsageError, match=r"config argument 'sfd=x': no such key; did you mean sft\?"):
    cli.config_args("sfd=x", known)
  with pytest.raises(errors.UsageError, match=r"no such key; known: cls, sft, size"):
    cli.config_args("zzz=1", known)


def test_a_misspelt_config_argument_ends_the_command_in_one_line(tmp_path, capsys):
  from clsalign_jax import evaluate

  code = evaluate.main(["evaluate", f"--config={ROOT / 'configs' / 'eval_smollm2.py'}:cls=/r,sfd=/s"])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1
  assert "config argument 'sfd=/s': no such key; did you mean sft?" in err
