#!/usr/bin/env bash
# The GPU checks of the Triton scan and of training throughput, as one device run (about 5 minutes
# on an H100 after the machine's start):
#   1. tests/test_scan_triton.py with the kernels compiled for the GPU (against the sequential reference),
#      and tests/test_scan_fallback.py (failures injected: one warning, then the PyTorch path);
#   2. bench/scan.py at the paper's block size, batch 16: PyTorch scan vs Triton, chunks of 16, 32 and 64;
#   3. bench/train.py --paper: tokens/s precomputed vs on the fly (model.scan auto; the Triton chunk and
#      config pinned to the ones step 2 chose, so no autotuning lands inside the timed steps). Each
#      bench prints what ran: a kernel that failed and fell back to PyTorch shows there.
# Logs go to $OUT (the device tool's folder) or /tmp/gpu_check.
#
# The lent machines have torch, triton, h5py, accelerate and pytest but not fair-esm: carry it from
# the project's venv. To time the earlier position-by-position kernel in the same run (step 2b), put
# it in the ignored folder .bench_old first: `mkdir -p .bench_old && git show
# 7ca7c22:ptm_mamba/scan_triton.py > .bench_old/scan_triton_seq.py`. With the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".venv/lib/python3.11/site-packages/esm", ".bench_old"],
#       timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.venv/lib/python3.11/site-packages"  # only esm/ travels there
export PYTHONUNBUFFERED=1
log="${OUT:-/tmp/gpu_check}"
mkdir -p "$log"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The versions this run used (the GPU set pins torch 2.13.0 and, through it, triton 3.7.1: a lent
# machine may have others, so the numbers below are for these), and the doctor's view of the machine.
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee "$log/versions.txt"
python3 -m ptm_mamba doctor 2>&1 | tee "$log/doctor.txt"

echo "== 1. Triton scan tests and the fallbacks on the GPU"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_scan_triton.py tests/test_scan_fallback.py 2>&1 \
  | tee "$log/tests.log" | tail -15

echo "== 2. scan fwd+bwd, (16, 1536, 16, 1024)"
for chunk in 16 32 64; do
  echo "-- chunk $chunk"
  scans=triton; [ "$chunk" = 32 ] && scans="torch triton"
  timeout 120 python3 bench/scan.py --device cuda --batch 16 --repeats 10 --skip-ref --chunk "$chunk" \
    --scan $scans 2>&1 | tee "$log/scan-$chunk.log"
done
if [ -f .bench_old/scan_triton_seq.py ]; then
  echo "-- 2b. the earlier position-by-position Triton kernel (commit 7ca7c22), same inputs"
  timeout 120 python3 - <<'EOF' 2>&1 | tee "$log/scan-seq.log"
import importlib.util, sys
sys.path.insert(0, "bench")
import scan as bench
spec = importlib.util.spec_from_file_location("scan_triton_seq", ".bench_old/scan_triton_seq.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
inputs = bench.make_inputs(16, 1536, 16, 1024, "cuda")
r = bench.time_scan(old.selective_scan_triton, inputs, 10, True, "cuda")
print("old[triton]    " + "  ".join(f"{k} {v:.4f} s" for k, v in r.items()))
EOF
fi
best_chunk=$(for c in 16 32 64; do awk -v c="$c" '/^ours(\[triton\])? / {print $6, c}' "$log/scan-$c.log"; done | sort -g | head -1 | cut -d' ' -f2)
block=$(grep -o 'bwd [0-9]*x[0-9]*' "$log/scan-${best_chunk:-32}.log" | cut -d' ' -f2)
echo "fastest chunk: ${best_chunk:-?}, bwd config: ${block:-?}"

echo "== 3. training tokens/s at the paper's size"
timeout 300 python3 bench/train.py --device cuda --paper --steps 8 --warmup 4 --threads 8 --workers 2 \
  --scan auto --chunk "${best_chunk:-32}" ${block:+--block "$block"} 2>&1 | tee "$log/train.log"
