#!/usr/bin/env bash
# Wheels for a GPU machine that has CUDA torch (and triton, numpy, psutil, ...) but cannot reach a package index:
# writes .whl/ with the packages megadistill needs on top of such an image, which tools/gpu_check.sh installs from
# when deepspeed or omegaconf is missing. Run it where pip can reach PyPI, then carry .whl/ to the GPU machine.
#
# The default set is what the lent H200 image lacks (its list: /work/.library/device/KINDS.md): DeepSpeed and the
# parts of its requirements not in the image (hjson, pydantic with its core and typing helpers), omegaconf and
# liger-kernel. Versions are the ones tested here. DeepSpeed is published as a source archive only: it is built into a
# pure-Python wheel here (no CUDA ops compiled in; DeepSpeed JIT-builds the few it needs on first use, and the trainer
# on one GPU needs none). The binary one, pydantic-core, is fetched for the GPU machine's Python (GPU_PYTHON, 3.12).
#
# Usage: tools/gpu_wheels.sh [EXTRA_SPEC ...]     e.g. tools/gpu_wheels.sh datasets==4.1.0   (no dependencies added)
# Then:  run carry=[".whl"]  command="tools/gpu_check.sh $OUT/gpu.json"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
GPU_PYTHON=${GPU_PYTHON:-3.12}
OUT=${GPU_WHEELS_DIR:-.whl}
LIMIT_MIB=${GPU_WHEELS_LIMIT_MIB:-48}  # the device tool carries 64 MiB with the working tree

PURE=(hjson==3.1.0 omegaconf==2.4.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
      liger-kernel==0.8.5)
BINARY=(pydantic-core==2.50.5)  # must match pydantic's pin
BUILT=(deepspeed==0.19.8)

rm -rf "$OUT" && mkdir -p "$OUT"
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  PLAT+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" "${PURE[@]}" "$@"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
  "${PLAT[@]}" -d "$OUT" "${BINARY[@]}"
# DeepSpeed's setup.py imports torch: build without isolation, with this environment's torch (CPU is fine, DS_BUILD_OPS=0)
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "${BUILT[@]}"

for w in "$OUT"/*.whl; do
  case "$w" in *-none-any.whl|*cp${GPU_PYTHON/./}*manylinux*x86_64*.whl) ;;
    *) echo "gpu_wheels: $w is not for CPython $GPU_PYTHON on x86_64 Linux" >&2; exit 1 ;; esac
done
mib=$(du -sm "$OUT" | cut -f1)
if [ "$mib" -gt "$LIMIT_MIB" ]; then
  echo "gpu_wheels: $OUT is $mib MiB, over $LIMIT_MIB (the device tool carries 64 MiB with the tree)" >&2; exit 1
fi
ls -1 "$OUT"
echo "gpu_wheels: $(ls "$OUT" | wc -l) wheels, $mib MiB in $OUT/" >&2
