#!/usr/bin/env bash
# GPU check (~10 minutes on one GPU): each recipe in configs/recipes, run for a few steps on a small
# real model (the embedded SmolLM2-135M, or MODEL=...), under the recipe's own accelerate config
# (FSDP over the GPUs there are; single.yaml on one). Per recipe, benchmarks/gpu_train.py reports
# tokens/s and MFU, the peak GPU memory against the memory plan, and whether the student was saved
# in the dtype it was trained in (bf16 tensors, config.json and stillhouse_train.json agree).
#
#   bash benchmarks/gpu_check.sh                      # results in gpu-check/<recipe>.json, summary printed
#   MODEL=HuggingFaceTB/SmolLM2-360M STEPS=30 bash benchmarks/gpu_check.sh
#   ALLOW_CPU=1 SEQ_LEN=128 STEPS=2 N=16 bash benchmarks/gpu_check.sh   # CPU smoke run of this script (no MFU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-gpu-check}
MODEL=${MODEL:-models/teacher}
STEPS=${STEPS:-20}
SEQ_LEN=${SEQ_LEN:-512}
N=${N:-3000}                 # synthetic examples
BATCH=${BATCH:-4}
PER_RECIPE_S=${PER_RECIPE_S:-240}
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
EXTRA=()
if [ "$NGPU" = 0 ]; then
  if [ -z "${ALLOW_CPU:-}" ]; then
    echo "gpu_check: no CUDA device here, nothing checked (ALLOW_CPU=1 for a CPU smoke run)" >&2; exit 1
  fi
  EXTRA=(--allow-cpu); NGPU=1; export ACCELERATE_USE_CPU=true
fi
mkdir -p "$OUT"
if [ ! -d "$MODEL" ] && [ "$MODEL" = models/teacher ]; then
  python -m stages.teacher_model          # materialise the embedded SmolLM2-135M (no network needed)
fi
FAILED=0
for recipe in $(ls configs/recipes/*.yaml | xargs -n1 basename | sed 's/\.yaml$//'); do
  cfg=$(python -c "import yaml; print(yaml.safe_load(open('configs/recipes/$recipe.yaml'))['train']['accelerate_config'])")
  n=$NGPU; [ "$cfg" = configs/accelerate/single.yaml ] && n=1
  echo "== $recipe: $cfg on $n process(es), $STEPS steps of $BATCH x $SEQ_LEN tokens, $MODEL"
  timeout "$PER_RECIPE_S" python -m accelerate.commands.launch --config_file "$cfg" --num_processes "$n" \
    --main_process_port $((29500 + RANDOM % 1000)) -m benchmarks.gpu_train --recipe "$recipe" --model "$MODEL" \
    --synthetic "$N" --seq-len "$SEQ_LEN" --steps "$STEPS" --warmup-steps $((STEPS > 4 ? 3 : 0)) --batch-size "$BATCH" \
    --out "$OUT/$recipe.json" "${EXTRA[@]}" > "$OUT/$recipe.log" 2>&1 || {
    echo "   FAILED (see $OUT/$recipe.log)"; tail -20 "$OUT/$recipe.log"; FAILED=$((FAILED + 1)); continue; }
  python - "$OUT/$recipe.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if "peak_reserved_mb" in r:
    memory = (f"plan {r['planned_memory_mb']} MiB vs peak reserved {r['peak_reserved_mb']} + outside torch "
              f"{r['outside_torch_mb']} MiB ({100 * r['plan_error']:+.0f}%), without its 1 GiB overhead vs live "
              f"{r['peak_memory_mb']} MiB ({100 * r['plan_error_live']:+.0f}%)")
else:
    memory = f"plan {r['planned_memory_mb']} MiB vs peak RSS {r['peak_memory_mb']} MiB ({100 * r['plan_error']:+.0f}%)"
print(f"   {r['device']}: {r['tokens_per_s']} tok/s, MFU {r['mfu']}, {memory}, saved {r['saved_tensor_dtypes']} "
      f"(trained {r['dtype']}): {'ok' if r['saved_in_training_dtype'] else 'WRONG'}")
PY
done
if [ "$FAILED" != 0 ]; then echo "gpu_check: $FAILED recipe(s) failed" >&2; exit 1; fi
