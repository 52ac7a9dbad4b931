"""Both notebooks run top to bottom in a fresh kernel at the small budget (no network: the Colab
install cell is skipped), and they are stored without outputs."""

import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("quickstart", "strategic_decoding")


def _read(name: str):
  return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs of {cell.id}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_install_cell_pins_versions_and_says_to_restart(name):
  text = "".join(cell.source for cell in _read(name).cells)
  assert "YOUR_ORG" not in text
  install = _read(name).cells[1].source
  assert '"-c", "clsalign-jax/requirements/constraints.txt"' in install
  assert "restart the runtime" in install and 'os.environ.get("CLSALIGN_REPO_URL", "")' in install


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_small_budget(name, monkeypatch, record_figure):
  # The kernel inherits this environment.
  monkeypatch.setenv("CLSALIGN_NOTEBOOK_BUDGET", "small")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = _read(name)
  start = time.monotonic()
  NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  record_figure(f"notebook {name}, small budget (s)", time.monotonic() - start)

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "budget: small" in text
  assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} drew no figure"
  if name == "quickstart":
    assert "probe accuracy" in text and "prompt-time p(malicious)" in text
  else:
    assert "refusal inserted" in text and "re-classified at steps" in text
