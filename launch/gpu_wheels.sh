#!/usr/bin/env bash
# Build .whl/: the Python packages the trainer, the tests and the benchmarks need that a bare GPU
# image with Python 3.12, torch and Triton (and numpy, PyYAML, msgpack, ninja, psutil, py-cpuinfo,
# einops, tqdm, safetensors, tokenizers, transformers, matplotlib, pytest) does not have, as wheels
# for Python 3.12 on x86-64 Linux. Run it on any machine with pip and a registry; the GPU machine
# needs no network: launch/gpu_check.sh installs these into a private folder (docs/gpu.md).
#
#   launch/gpu_wheels.sh            # = make gpu-wheels; versions are those of $PYTHON's environment
#   DEST=/tmp/w launch/gpu_wheels.sh
#
# Versions come from the environment this runs in (the project's .venv), which the CPU suite
# tests: the carried packages are then the ones that were tested, and pairs pinned to each other
# (pydantic and pydantic-core) stay consistent.
set -euo pipefail

PYTHON=${PYTHON:-python3}
DEST=${DEST:-.whl}
PY_TARGET=${PY_TARGET:-3.12}

# What the image lacks, with why it is needed. typing-extensions is in the image, but pydantic
# needs a newer one than an image may hold; the carried one shadows it (it only adds names).
PURE=(
    hjson                   # deepspeed (config parsing)
    pydantic                # deepspeed (config models)
    annotated-types         # pydantic
    typing-inspection       # pydantic
    typing-extensions       # pydantic >= 2.12 needs >= 4.14
    hydra-core              # train.config
    omegaconf               # hydra-core, train.config
)
BINARY=(
    pydantic-core           # pydantic (compiled: cp312 manylinux wheel)
)
# Published as source only: built here into py3-none-any wheels. DeepSpeed compiles no op at
# build time (DS_BUILD_OPS=0); on the GPU its fused Adam is compiled on first use (ninja, nvcc).
SDIST=(
    deepspeed
    antlr4-python3-runtime  # omegaconf's grammar runtime (pinned to 4.9.* by omegaconf)
)

version() {
    "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || {
        echo "error: $1 is not installed in $PYTHON's environment (run make setup, or set PYTHON=)" >&2
        exit 2
    }
}

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two of one package stop pip's install
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
specs=()
for name in "${PURE[@]}" "${BINARY[@]}"; do
    specs+=("$name==$(version "$name")")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_TARGET" --implementation cp \
    "${platforms[@]}" -d "$DEST" "${specs[@]}"
for name in "${SDIST[@]}"; do
    # No build isolation: DeepSpeed's setup.py imports torch, which an isolated build would download.
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --no-binary "$name" \
        -w "$DEST" "$name==$(version "$name")"
done
for w in "$DEST"/*.whl; do
    case "$(basename "$w")" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | *-"cp${PY_TARGET/./}"-*manylinux*x86_64.whl) ;;
        *) echo "error: $w: not a wheel for Python $PY_TARGET on x86-64 Linux" >&2; exit 1 ;;
    esac
done
du -b "$DEST"/*.whl | awk '{printf "%8.1f KiB  %s\n", $1 / 1024, $2; total += $1}
                          END {printf "%8.1f MiB  in all\n", total / 1048576}'
