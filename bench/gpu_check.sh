#!/usr/bin/env bash
# One prepared GPU check of the fused gated-LoReFT kernels (under 5 minutes on an H100/H200):
#   1. the kernels vs a float64 reference in fp32 and bf16 (outputs, gate, all gradients; masks, thresholds,
#      the MLP-gate variant, deterministic mode bitwise, torch.compile fullgraph);
#   2. copy bandwidth, then the kernel benchmark (triton / torch / reference / compile; fwd and fwd+bwd;
#      rows 1..16384, d 4096, r 4, bf16) with the fraction of the bandwidth roofline reached and peak memory;
#   2b. time per call at decode sizes with calls queued back to back (bench/bench_host.py --device cuda);
#   3. a short sweep of Triton block sizes at 16384 rows (to tune kernels/gated_loreft.py defaults);
#   3b. compiled decoding: generate with a static KV cache, decode steps under torch.compile mode=reduce-overhead
#      (CUDA graphs), Llama-1B shape, batch 1/8/32, unpatched vs last_prompt / all (targets +1 % / +3 %); rows
#      appended per batch, so a run cut by its 60 s (compilation takes most of it) keeps the batches it finished;
#   4. the benchmark suite's op and serving groups (python -m bench: d 4096/3584/2048, generate on Llama shapes
#      up to 8B with random weights, batch 1/8/32) and its report, so RESULTS.md gets the GPU's table
#      (skip with GRUN_GPU_SUITE=0; the GPU machine may lack transformers: the suite then skips serving).
# Installs nothing: the package is imported from the checkout (bench/bench_kernels.py falls back to a sys.path
# shim when grun_fast is not installed). Rows go to bench/results/results.csv; the log, results.csv, RESULTS.md
# and the plots are copied under $OUT when set.
#
#   bash bench/gpu_check.sh            # from the repository root, on a machine with a CUDA GPU
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
DEST=${OUT:-bench/results}
mkdir -p "$DEST" bench/results
LOG="$DEST/gpu_check_${STAMP}.log"
CSV="bench/results/results.csv"
export PYTHONUNBUFFERED=1  # a step cut by its timeout still leaves its lines in the log

main() {
echo "== gpu_check $STAMP"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory --format=csv || true
$PY - <<'EOF'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
EOF
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: run 'python bench/bench_kernels.py --quick' and '--check --quick' on CPU instead"
    return 2
fi

status=0
echo; echo "== 1. correctness vs float64 (fp32 1e-5, bf16 2e-2)"
timeout 130 $PY bench/bench_kernels.py --check || { echo "CHECK FAILED (rc=$?)"; status=1; }

echo; echo "== 2. bandwidth roofline and benchmark (bf16, d=4096, r=4)"
timeout 110 $PY bench/bench_kernels.py --bandwidth --repeats 25 --csv "$CSV" \
    --providers triton triton-det torch reference compile || { echo "BENCH FAILED (rc=$?)"; status=1; }

echo; echo "== 2b. time per call at 1 and 16 rows, calls queued (host-bound there: targets 20 us inference, 60 us training)"
timeout 40 $PY bench/bench_host.py --device cuda --samples 9 --calls 200 --csv "$CSV" \
    || echo "host-time bench incomplete (rc=$?)"

echo; echo "== 3. block-size sweep (rows=16384)"
timeout 35 $PY bench/bench_kernels.py --sweep --rows 16384 --repeats 15 --providers triton \
    || echo "sweep incomplete (rc=$?)"

echo; echo "== 3b. compiled decoding: static cache, torch.compile reduce-overhead (CUDA graphs), Llama-1B shape"
timeout 60 $PY bench/bench_serving.py --model 1b --batch 1 8 32 --prompt-len 32 --new-tokens 16 --repeats 5 \
    --compile reduce-overhead || echo "compiled decoding incomplete (rc=$?)"

if [ "${GRUN_GPU_SUITE:-1}" != "0" ]; then
    echo; echo "== 4. benchmark suite: op and serving groups, then the report"
    timeout 180 $PY -m bench --groups op serving || echo "suite incomplete (rc=$?)"  # 240 s before 3b took 60
    timeout 60 $PY -m bench.report > /dev/null || echo "report failed (rc=$?)"
fi

if [ "$DEST" != "bench/results" ]; then
    for f in "$CSV" bench/results/RESULTS.md bench/results/op.png bench/results/serving.png; do
        [ -f "$f" ] && cp "$f" "$DEST/"
    done
fi
echo; echo "== done: status $status; log $LOG"
return $status
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
