#!/usr/bin/env bash
# The demo (README's main command runs it through `make demo`): prepare the embedded dataset,
# train recipes/demo_cpu.json on 2 CPU processes with expert-parallel size 2 using the deepspeed
# launcher, export to one HF folder, load it without DeepSpeed, caption test images.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
RECIPE=${RECIPE:-recipes/demo_cpu.json}
DS_CONFIG=${DS_CONFIG:-ds_configs/cpu_zero1_fp32.json}
NPROC=${NPROC:-2}
RUN=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['train']['output_dir'])" "$RECIPE")
start=$(date +%s)

[ -f data/embedded/manifest.json ] || $PY -m mmoe_ds.cli prepare --source embedded --out data/embedded
$PY -m mmoe_ds.train --check --recipe "$RECIPE" --deepspeed_config "$DS_CONFIG" --world_size "$NPROC"
[ "${RESUME:-0}" = 1 ] || rm -rf "$RUN"
.venv/bin/deepspeed --num_gpus "$NPROC" --module mmoe_ds.train --recipe "$RECIPE" --deepspeed_config "$DS_CONFIG"
$PY -m mmoe_ds.cli export "$RUN" "$RUN/export"
echo "--- captions from the export, loaded with trust_remote_code and DeepSpeed blocked:"
$PY - "$RUN/export" <<'PYEOF'
import sys
sys.modules["deepspeed"] = None  # importing it would now fail: the export must not need it
from mmoe_ds.export.caption import main
main([sys.argv[1], "--num", "6"])
PYEOF
echo "--- final evaluation:"
tail -n 1 <(grep '"kind": "eval"' "$RUN/metrics.jsonl")
echo "routing report: $RUN/report/routing_report.png and $RUN/report/routing_report.md"
echo "export: $RUN/export   metrics: $RUN/metrics.jsonl   total time: $(( $(date +%s) - start )) s"
