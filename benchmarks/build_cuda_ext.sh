#!/usr/bin/env bash
# Compile the CUDA extension sparsellm._C on a machine without a GPU, for sm_80 and sm_90.
#
# Why a separate venv: the project venv carries the CPU build of torch; the extension must be
# compiled against a CUDA build (headers, libc10_cuda, the CUDA version torch checks nvcc
# against). The CUDA wheel is ~5.5 GB, so it lives outside the repo (default /work/venv-cuda,
# override with SPARSELLM_CUDA_VENV) and is created only once.
#
# Output goes to a temporary directory (printed at the end), never into the repo, so the
# lead's working tree stays clean. Exit status is non-zero if anything fails.
#
# Usage: bash benchmarks/build_cuda_ext.sh [--keep]   (--keep: do not delete the build dir)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPARSELLM_CUDA_VENV:-/work/venv-cuda}"
TORCH_SPEC="${SPARSELLM_CUDA_TORCH:-torch==2.14.1}"
PYTHON="${PYTHON:-python3.11}"
KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1

# --- the toolkit: nvcc may be a wrapper script (as here), so ask it where it really lives
NVCC="$(command -v nvcc || true)"
if [[ -z "$NVCC" ]]; then
    echo "nvcc not found on PATH" >&2; exit 1
fi
if [[ -z "${CUDA_HOME:-}" ]]; then
    for cand in "$(dirname "$(readlink -f "$NVCC")")/.." /usr/local/cuda; do
        if [[ -f "$cand/include/cuda_runtime.h" && -x "$cand/bin/nvcc" ]]; then
            CUDA_HOME="$(cd "$cand" && pwd)"; break
        fi
    done
    # a wrapper script (exec /path/to/nvcc "$@") hides the toolkit: read the path out of it
    if [[ -z "${CUDA_HOME:-}" ]] && head -c 2 "$NVCC" | grep -q '#!'; then
        real="$(grep -o '/[^ ]*/bin/nvcc' "$NVCC" | head -1)"
        [[ -n "$real" ]] && CUDA_HOME="$(cd "$(dirname "$real")/.." && pwd)"
    fi
fi
if [[ -z "${CUDA_HOME:-}" ]]; then
    echo "could not locate the CUDA toolkit; set CUDA_HOME" >&2; exit 1
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
echo "== CUDA_HOME=$CUDA_HOME"
"$CUDA_HOME/bin/nvcc" --version | tail -2

# --- the venv with the CUDA build of torch (pip finds the wheel on local disk here)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "== installing $TORCH_SPEC (CUDA build) into $VENV"
    pip install --quiet "$TORCH_SPEC"
fi
python -c "import setuptools, ninja" 2>/dev/null || pip install --quiet setuptools ninja wheel
python -c "import numpy" 2>/dev/null || pip install --quiet numpy  # silences torch's numpy warning
python - <<'EOF'
import torch
print(f"== torch {torch.__version__}, built for CUDA {torch.version.cuda}, GPU present: {torch.cuda.is_available()}")
EOF

# --- build (parallel jobs kept modest: the machine is shared)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export SPARSELLM_BUILD_EXT=1
OUT="$(mktemp -d /tmp/sparsellm-ext.XXXXXX)"
echo "== building into $OUT (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
cd "$REPO"
# build_ext with explicit temp/lib dirs keeps every artefact out of the repo
python setup.py -q build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" 2>&1 | tee "$OUT/build.log"
rm -rf "$REPO/sparsellm.egg-info.tmp" 2>/dev/null || true

SO="$(find "$OUT/lib" -name '_C*.so' | head -1)"
if [[ -z "$SO" ]]; then
    echo "== FAILED: no _C*.so produced (log: $OUT/build.log)" >&2; exit 1
fi
echo "== built $SO ($(du -h "$SO" | cut -f1))"

# --- check the fat binary holds code for both architectures
CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
[[ -x "$CUOBJDUMP" ]] || CUOBJDUMP="$(command -v cuobjdump || true)"  # the toolkit's, else PATH's
if [[ -n "$CUOBJDUMP" ]]; then
    "$CUOBJDUMP" --list-elf "$SO" | sed 's/^/   /' | sort -u | head -20 || true  # head may close the pipe early
else
    # no cuobjdump in this toolkit: the sm_XX names are embedded in the fatbin's ELF headers
    for arch in sm_80 sm_90; do
        if grep -c -a "$arch" "$SO" >/dev/null; then echo "   $arch: present"; else echo "   $arch: MISSING" >&2; exit 1; fi
    done
fi

# --- the module must load (no GPU needed to load it) and expose every op the backend registers.
# Loaded straight from the file: the repo's own sparsellm package would otherwise shadow it.
cd /tmp
SO="$SO" REPO="$REPO" python - <<'EOF'
import importlib.util, os, runpy
import torch  # loads libc10 / libtorch before the extension
spec = importlib.util.spec_from_file_location("sparsellm._C", os.environ["SO"])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
names = sorted(n for n in dir(C) if not n.startswith("_"))
print("== sparsellm._C loads; functions:", ", ".join(names))
expected = {"obs_prune_block", "damped_cholesky", "cholesky_inverse_upper", "nm_mask", "compiled_constants"}
missing = expected - set(names)
assert not missing, f"missing bindings: {missing}"
# compiled with the -D definitions of sparsellm/kernel_constants.py (what the backend checks)
constants = runpy.run_path(os.path.join(os.environ["REPO"], "sparsellm", "kernel_constants.py"))["CONSTANTS"]
assert dict(C.compiled_constants()) == constants, (C.compiled_constants(), constants)
print("== compiled constants match sparsellm/kernel_constants.py:", constants)
EOF

if [[ $KEEP -eq 0 ]]; then
    rm -rf "$OUT/temp"
    echo "== build dir removed (kept $OUT/lib and $OUT/build.log); pass --keep to keep objects"
fi
echo "== OK"
