#!/usr/bin/env bash
# One GPU check (docs/gpu.md): the gpu-marked tests, the smoke run in bf16, with fp8=torch (and
# fp8=te where Transformer Engine imports), bench/fp8_gemm.py and bench/model_step.py, into one
# results file. Made for a bare single-GPU machine with torch and Triton but without the
# trainer's other packages and without network: when .whl/ holds wheels (launch/gpu_wheels.sh,
# built elsewhere) and those packages do not import, they are installed into a private folder
# first and put on PYTHONPATH; nothing else on the machine changes.
#
#   launch/gpu_check.sh --out results/              # ~5 min (estimated) on one GPU; exit 0 = all passed
#   launch/gpu_check.sh --dry-run                   # the steps and their commands only
#   PYTHON=/opt/venv/bin/python launch/gpu_check.sh --steps env smoke_bf16 --out results/
#
# Arguments go to bench/gpu_check.py (--out, --work, --time-limit, --steps, --dry-run).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
SITE=${MOEFORGE_SITE:-/tmp/moeforge-site}   # where the carried wheels are installed
WHEELS=${MOEFORGE_WHEELS:-.whl}             # launch/gpu_wheels.sh's DEST
NEEDED=(deepspeed hydra omegaconf pydantic)

missing() {
    ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
        "${NEEDED[@]}"
}

if missing; then
    wheels=("$WHEELS"/*.whl)
    if [[ ! -e ${wheels[0]} ]]; then
        echo "error: ${NEEDED[*]}: not all importable by $PYTHON and no wheels in $WHEELS/ (build them with" \
            "launch/gpu_wheels.sh on a machine with a package registry; docs/gpu.md)" >&2
        exit 2
    fi
    # --no-index --no-deps: the machine has no network, and the image's own packages stay as they are.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if missing; then
        echo "error: ${NEEDED[*]}: still not importable after installing $WHEELS/ into $SITE" >&2
        exit 2
    fi
fi
exec "$PYTHON" bench/gpu_check.py --python "$PYTHON" "$@"
