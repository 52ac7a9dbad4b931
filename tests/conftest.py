"""Shared pytest setup: a figure log printed in the terminal summary, so CI output carries the
measured parity numbers (docs/interop.md records them)."""

import pytest

_FIGURES: list[tuple[str, str]] = []


@pytest.fixture
def record_figure():
  def record(name: str, value) -> None:
    _FIGURES.append((name, value if isinstance(value, str) else f"{value:.3g}"))

  return record


def pytest_terminal_summary(terminalreporter):
  if _FIGURES:
    terminalreporter.section("measured figures")
    width = max(len(n) for n, _ in _FIGURES)
    for name, value in _FIGURES:
      terminalreporter.write_line(f"{name.ljust(width)}  {value}")


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory):
  """(base url, engine, run directory) of one warmed-up OpenAI-compatible server on a tiny CLS run,
  shared by the serving and playground tests (tests/serve_utils.py)."""
  from serve_utils import tiny_server as start  # noqa: PLC0415 - jax and fastapi only for these tests

  with start(str(tmp_path_factory.mktemp("tiny_run"))) as running:
    yield running
