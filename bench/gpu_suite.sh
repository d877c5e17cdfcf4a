#!/usr/bin/env bash
# The GPU run of the fast path (issue 21), about 5 minutes on one H100/H200:
#   1. numerics: DroplessMoE (torch reference and Triton kernels) and TorchMoE's grouped path vs the
#      per-expert loop, forward and all gradients, at the benchmark shapes (bench/moe_layer.py --checks-only);
#   2. bench/moe_layer.py: dense limit, grouped GEMMs alone, DroplessMoE reference / fused / modality_bias,
#      DeepSpeed stock (cf 1.25) and dropless, TorchMoE, balanced and Zipf routing, peak memory,
#      host syncs of the fused layer (torch.cuda.set_sync_debug_mode);
#   3. bench/train_step.py: tokens/s and MFU of recipes/gpu_node.json with TorchMoE, DeepSpeed's
#      MOELayer and DroplessMoE blocks;
#   then a table and one JSON line (bench/gpu_suite_summary.py), also in OUT_DIR/summary.json.
#
#   bash bench/gpu_suite.sh [--out DIR]      # needs CUDA; refuses to start without it
#   bash bench/gpu_suite.sh --dry-run        # the same pipeline on the CPU at toy sizes (CI)
#
# DeepSpeed missing (the GPU machine has none): wheels in .whl/ (bash ../shared/gpu/wheels.sh) are
# installed into /tmp/site first. Each step has a time limit, so the suite cannot overrun by much.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out_dir="${OUT:-runs/gpu_suite}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out_dir="$2"; shift ;;
    *) echo "gpu_suite.sh: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${PYTHON:-}" ]; then
  if [ "$dry_run" = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29533}"

if [ "$dry_run" = 1 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  layer_args=(--device cpu --tokens 32 --shapes tiny --dtype float32 --warmup 0 --iters 1)
  step_args=(--device cpu --dtype float32 --recipe recipes/demo_cpu.json --steps 1 --warmup 0)
else
  if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: no CUDA device (torch.cuda.is_available() is False with $PYTHON); run it on a GPU" \
         "machine, or pass --dry-run for the CPU pipeline check" >&2
    exit 2
  fi
  if ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_suite.sh: DeepSpeed is not installed and .whl/ is empty;" \
                                            "run bash ../shared/gpu/wheels.sh on the CPU machine first" >&2; exit 2; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
  layer_args=(--warmup 3 --iters 10)
  step_args=(--steps 10 --warmup 3)
fi

mkdir -p "$out_dir"
start=$(date +%s)
run() {  # run LIMIT_S NAME CMD...: stdout+stderr to OUT_DIR/NAME.txt, the table part echoed
  local limit="$1" name="$2"; shift 2
  echo "== $name: $*"
  if ! timeout "$limit" "$@" >"$out_dir/$name.txt" 2>&1; then
    echo "gpu_suite.sh: step $name failed or ran past ${limit} s; its output: $out_dir/$name.txt" >&2
    tail -n 30 "$out_dir/$name.txt" >&2
    return 1
  fi
  grep -v '^{' "$out_dir/$name.txt" | grep -E '^(check|skipped|d[0-9]|shape|recipe|moe backend|recipes/)' || true
}
status=0
run 90 checks "$PYTHON" bench/moe_layer.py --checks-only "${layer_args[@]}" || status=1
run 200 moe_layer "$PYTHON" bench/moe_layer.py --skip-checks "${layer_args[@]}" || status=1
for backend in torch deepspeed dropless; do
  run 45 "train_step_$backend" "$PYTHON" bench/train_step.py --moe-backend "$backend" "${step_args[@]}" || status=1
done
"$PYTHON" bench/gpu_suite_summary.py "$out_dir" --seconds "$(( $(date +%s) - start ))" | tee "$out_dir/summary.txt"
tail -n 1 "$out_dir/summary.txt" >"$out_dir/summary.json"
exit "$status"
