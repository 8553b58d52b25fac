#!/usr/bin/env bash
# Compile-only check of the CUDA sources (no torch headers needed: the .cu files are plain CUDA).
# Builds object files for sm_80 and sm_90 into a temporary folder. Exits 0 with a message where nvcc is absent.
#   usage: bash csrc/compile_check.sh        (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "${NVCC}" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "${NVCC}" ]]; then
    echo "compile_check: nvcc not found; skipping the CUDA compile check"
    exit 0
fi
out="$(mktemp -d "${TMPDIR:-/tmp}/vk_compile_check.XXXXXX")"
trap 'rm -rf "${out}"' EXIT
echo "compile_check: $("${NVCC}" --version | tail -n 2 | head -n 1)"
status=0
for cu in "${here}"/*.cu; do
    obj="${out}/$(basename "${cu%.cu}").o"
    if "${NVCC}" -c -std=c++17 -O3 -Xcompiler -Wall -Werror all-warnings \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
        -I"${here}" "${cu}" -o "${obj}"; then
        echo "compile_check: OK   $(basename "${cu}") -> sm_80, sm_90 ($(stat -c %s "${obj}") bytes)"
    else
        echo "compile_check: FAIL $(basename "${cu}")"
        status=1
    fi
done
exit "${status}"
