#!/usr/bin/env bash
# The GPU checks of the benchmark, as one script for a lent GPU machine (no network there).
#
#   bash benchmarks/gpu_check.sh [DATA_DIR] [TRAIN_SECONDS]
#
# 1. the meta-gradient check and timing of metagrad against the peers on the Omniglot
#    5-way 1-shot config (benchmarks/bench_maml.py --device cuda; results as <date>-omniglot-5w1s-cuda.md/.json), and
# 2. the omniglot-5w1s preset trained for TRAIN_SECONDS (default 60) on the GPU, then
#    evaluated: meta-iterations per second from the run's metrics.csv.
# Needs python3 with a CUDA torch. Peers (higher, torchopt + optree) and tomli_w are
# installed from wheels in .whl/ when present (pip download ... -d .whl on a networked
# machine). Results go to $OUT (default /tmp/gpu-check).
set -u
DATA=${1:-data/omniglot}
SECONDS_TRAIN=${2:-60}
TRAIN_SET=${TRAIN_SET:-}  # extra --set for the training run, e.g. compile=true
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/metagrad-site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L || true
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/metagrad-site "$WHEELS"/*.whl || exit 1
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/metagrad-site . || exit 1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
DEV=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

# 1. benchmark (interleaved rounds, fresh process per library and round); SKIP_BENCH=1 skips it
[ -n "${SKIP_BENCH:-}" ] || timeout 300 $PY benchmarks/bench_maml.py --config omniglot-5w1s --device "$DEV" \
    --rounds 2 --iters 20 --warmup 3 --libs metagrad,metagrad-compile,torchopt-metasgd,torchopt,higher \
    --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log"

# 2. the preset, trained for a fixed wall time, then evaluated on 600 test tasks
RUN=/tmp/gpu-check-run
rm -rf "$RUN"
timeout $((SECONDS_TRAIN + 240)) $PY -m metagrad train omniglot-5w1s --device "$DEV" --data-dir "$DATA" \
    --out "$RUN" ${TRAIN_SET:+--set $TRAIN_SET} --set "time_limit_min=$($PY -c "print($SECONDS_TRAIN / 60)")" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -n 40 | tee "$OUT/train.log"
cp "$RUN/metrics.csv" "$OUT/metrics.csv" 2>/dev/null
$PY - "$RUN/metrics.csv" <<'EOF' | tee -a "$OUT/train.log"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
last = rows[-1]
its, secs = int(last["iteration"]), float(last["elapsed_s"])
print(f"training: {its} meta-iterations in {secs:.1f} s (validation included) = {its / secs:.1f} it/s")
# between consecutive log rows that hold no validation: the meta-iteration rate alone
rates = sorted(
    (int(b["iteration"]) - int(a["iteration"])) / (float(b["elapsed_s"]) - float(a["elapsed_s"]))
    for a, b in zip(rows, rows[1:]) if not b.get("val_accuracy")
)
if rates:
    print(f"training rate without validation: median {rates[len(rates) // 2]:.1f} it/s over {len(rates)} log intervals")
EOF
