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
