#!/usr/bin/env bash
# Create the reference-stack venv (pyreft/pyvene + transformers 4.45.1) used by
# bench/bench_training_vs_reference.py, apart from the project's own venv.
# Downloads packages from PyPI (about 1.5 GB on disk, torch included).
# Usage: bench/reference_stack/setup_venv.sh [VENV_DIR]   (default: <repo>/.cache/ref_venv)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/.cache/ref_venv}"
python="${PYTHON:-python3}"
marker="$venv/.grun_ref_complete"

if [ -f "$marker" ] && "$venv/bin/python" -c "import pyreft, pyvene" >/dev/null 2>&1; then
  echo "reference venv ready: $venv"
  exit 0
fi
echo "creating the reference-stack venv in $venv (pyreft 0.1.0, pyvene 0.1.8, transformers 4.45.1;" \
     "downloads from PyPI, a minute or two)"
rm -rf "$venv"   # a half-made venv from an interrupted run
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and alone: the CPU wheel on this machine's disk; nothing later may pull another build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -r "$here/requirements.txt"
"${pip[@]}" --no-deps -r "$here/requirements-nodeps.txt"
"$venv/bin/python" - <<'PY' 2>&1 | grep -v nnsight
import torch, transformers, pyvene, pyreft
assert transformers.__version__ == "4.45.1", transformers.__version__
print("reference venv: torch", torch.__version__, "transformers", transformers.__version__)
PY
touch "$marker"
echo "reference venv ready: $venv"
