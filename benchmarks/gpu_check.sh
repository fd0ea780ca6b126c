#!/usr/bin/env bash
# The GPU figures of docs/performance.md, in under 8 minutes on one H100/H200 (issue 24): each stage in its own
# process under its own time limit, logs and JSON in the output folder, one summary table with the targets.
#
#   bash benchmarks/gpu_check.sh [--out DIR]            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry [--out DIR]      # every stage on the CPU, tiny sizes (GPU_CHECK_DRY=1 too)
#   bash benchmarks/gpu_check.sh --fetch-wheels         # here: the wheels the GPU machine lacks, into .whl/
#
# Stages: env; the quickstart (examples/quickstart/config.toml as the README runs it); the SD1.5-architecture U-Net
# (random weights) LoRA step at 512 px, batch 8, bf16, SDPA, ours and diffusers + peft (bench_gpu.py step: s/step,
# peak memory, MFU against a matmul rate measured there); SDXL at 1024 px with gradient checkpointing, U-Net only,
# cached text: peak memory; fp16 and bf16 short runs of builtin:mini (validation and samples in the fp16 one); a
# resume of the bf16 run from its saved state, compared with the uninterrupted run; the SD1.5 step with
# torch.compile; then the summary (bench_gpu.py summary: summary.txt and summary.json).
#
# It uses the machine's own python3 and CUDA torch. What that python lacks (diffusers and importlib_metadata on this
# workplace's H200 image) comes as wheels in $GPU_CHECK_WHEELS (default .whl/ at the repository root, made here by
# --fetch-wheels), installed with --no-deps into a folder on PYTHONPATH; nothing is fetched there.
# Environment: GPU_CHECK_DRY=1 (= --dry); GPU_CHECK_BUDGET_S (default 470: stages are cut or skipped to end within
# it; a dry run has no budget and ten times each stage's limit: a busy CPU is slow, not broken); GPU_CHECK_ONLY=
# "stage ..." (run only these into the same folder, e.g. to rerun one that failed; the summary reads what the folder
# holds); GPU_CHECK_WHEELS (the wheels' folder); PYTHON (default python3).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
DRY=${GPU_CHECK_DRY:-0}
OUT=""
FETCH=0
while (( $# )); do
  case $1 in
    --dry) DRY=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry, --out DIR or --fetch-wheels)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}

if (( FETCH )); then
  # pure-Python wheels, for the GPU machine's python (3.12 on this workplace's image); .gitignore keeps .whl/ out
  mkdir -p "$WHEELS"
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d "$WHEELS" "diffusers==$("$PY" -c 'import diffusers; print(diffusers.__version__)')" importlib_metadata
fi

if [ -z "$OUT" ]; then
  OUT=output/gpu_check
  [ "$DRY" = 1 ] && OUT=output/gpu_check_dry
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check.sh: cannot make --out $OUT" >&2; exit 2; }
ONLY=${GPU_CHECK_ONLY:-}
[ -z "$ONLY" ] && rm -f "$OUT/stages.jsonl"
BUDGET=${GPU_CHECK_BUDGET_S:-470}
SCALE=1
[ "$DRY" = 1 ] && { BUDGET=${GPU_CHECK_BUDGET_S:-1000000}; SCALE=10; }
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false

missing=$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("diffusers", "transformers", "accelerate", "peft", "safetensors") if not u.find_spec(m)))')
if [ -n "$missing" ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: $PY lacks $missing and $WHEELS holds no wheels (make them with --fetch-wheels)" >&2; exit 2
  fi
  SITE=$OUT/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check.sh: installing $WHEELS/*.whl failed" >&2; exit 2; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

# stage NAME LIMIT_S NEED_S command...: the command in its own process group (timeout's), its output in NAME.log,
# within LIMIT_S or what is left of the budget; skipped when less than NEED_S is left. A line in stages.jsonl.
stage() {
  local name=$1 limit=$(( $2 * SCALE )) need=$3; shift 3
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < need )); then
    echo "{\"name\": \"$name\", \"skipped\": \"${left} s of the budget left, ${need} s needed\"}" >>"$OUT/stages.jsonl"
    echo "--- $name: skipped (${left} s left)"
    return 1
  fi
  (( limit > left )) && limit=$left
  echo "--- $name (limit ${limit} s, at $(( SECONDS - START )) s)"
  local began=$SECONDS rc TIMEFORMAT='%3U %3S'  # bash's `time`: the stage's CPU seconds (user, system)
  { time timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1; } 2>"$OUT/$name.cpu"
  rc=$?
  local cpu; cpu=$(awk '{printf "%.1f", $1 + $2}' "$OUT/$name.cpu")
  printf '{"name": "%s", "rc": %d, "seconds": %d, "cpu_s": %s, "limit": %d}\n' "$name" "$rc" \
    $(( SECONDS - began )) "${cpu:-null}" "$limit" >>"$OUT/stages.jsonl"
  rm -f "$OUT/$name.cpu"
  (( rc == 0 )) || { echo "    failed (rc $rc; 124/137: time limit):"; tail -n 5 "$OUT/$name.log" | sed 's/^/    /'; }
  return $rc
}

BENCH=("$PY" benchmarks/bench_gpu.py)
TRAIN=("$PY" train_lora.py --config_file examples/quickstart/config.toml --overwrite)  # + each run's folders
if [ "$DRY" = 1 ]; then
  # tiny sizes on the CPU: 4 of the quickstart's images (one step an epoch), one prompt of 2 sampling steps
  rm -rf "$OUT/dry_data" && mkdir -p "$OUT/dry_data/1_star"
  for f in $(ls examples/quickstart/data/10_star/*.png | head -n 4); do
    cp "$f" "${f%.png}.txt" "$OUT/dry_data/1_star/"
  done
  echo "a red star on a yellow background --w 64 --h 64 --d 1 --l 5 --s 2" >"$OUT/dry_prompts.txt"
  DATA=(--train_data_dir "$OUT/dry_data" --sample_prompts "$OUT/dry_prompts.txt"
        --validation_prompts "$OUT/dry_prompts.txt")
  QUICKSTART=("${DATA[@]}" --max_train_epochs 2 --validation_every_n_epochs 1)
  VALIDATE_AT=2  # fp16 on a CPU is slow: one validation, at the end
  SHORT=("${DATA[@]}" --max_train_epochs 2)
  SAVE_AT=1
  STEP=(--quick --device cpu --batch 1 --resolution 64 --warmup 1 --steps 1)
  SD15=("${STEP[@]}")
  SDXL=("${STEP[@]}")
  # torch.compile's own cost on a CPU (dynamo's trace of the U-Net: a minute; inductor's code: minutes) is left out
  # of the dry run: the stage runs with dynamo off (tests/test_torch_compile.py traces the trainer's U-Net)
  COMPILE=(env TORCHDYNAMO_DISABLE=1)
  ENV_FLAGS=(--dry)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  QUICKSTART=()
  SHORT=(--max_train_epochs 1)  # 40 steps of builtin:mini
  SAVE_AT=20
  VALIDATE_AT=1
  SD15=(--batch 8 --resolution 512 --dtype bf16 --warmup 3 --steps 10)
  SDXL=(--batch 1 --resolution 1024 --dtype bf16 --warmup 2 --steps 3)
  COMPILE=()
  ENV_FLAGS=()
fi

stage env 60 10 "${BENCH[@]}" env "${ENV_FLAGS[@]}" --json "$OUT/env.json"
if [ "$DRY" != 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check.sh: $PY's torch sees no CUDA device (run with --dry on a CPU)" >&2; exit 2
fi
stage step_ours 120 40 "${BENCH[@]}" step --variant ours "${SD15[@]}" --json "$OUT/step_ours.json"
stage step_peft 120 40 "${BENCH[@]}" step --variant peft "${SD15[@]}" --json "$OUT/step_peft.json"
stage sdxl 120 40 "${BENCH[@]}" step --family sdxl --variant ours-checkpointing --rank 8 --no_flops "${SDXL[@]}" \
  --json "$OUT/sdxl.json"
stage sdxl_offload 120 40 "${BENCH[@]}" step --family sdxl --variant ours-checkpointing-offload --rank 8 --no_flops \
  "${SDXL[@]}" --json "$OUT/sdxl_offload.json"
stage quickstart 150 60 "${TRAIN[@]}" --output_dir "$OUT/quickstart" --logging_dir "$OUT/quickstart/logs" \
  "${QUICKSTART[@]}"
stage fp16 80 40 "${TRAIN[@]}" --output_dir "$OUT/fp16" --logging_dir "$OUT/fp16/logs" "${SHORT[@]}" \
  --mixed_precision fp16 --validation_every_n_epochs "$VALIDATE_AT"
if stage bf16 80 40 "${TRAIN[@]}" --output_dir "$OUT/bf16" --logging_dir "$OUT/bf16/logs" "${SHORT[@]}" \
    --mixed_precision bf16 --save_state --save_every_n_steps "$SAVE_AT"; then
  state=$(printf '%s/bf16/quickstart-step%08d-state' "$OUT" "$SAVE_AT")
  stage resume 80 40 "${TRAIN[@]}" --output_dir "$OUT/resume" --logging_dir "$OUT/resume/logs" "${SHORT[@]}" \
      --mixed_precision bf16 --save_every_n_steps "$SAVE_AT" --resume "$state" \
    && stage resume_compare 60 10 "${BENCH[@]}" compare "$OUT/bf16/quickstart.safetensors" \
      "$OUT/resume/quickstart.safetensors" --json "$OUT/resume_compare.json"
fi
stage step_compile 200 90 "${COMPILE[@]}" "${BENCH[@]}" step --variant ours-compile "${SD15[@]}" --no_flops \
  --json "$OUT/step_compile.json"

# its exit status says whether every stage ran (the targets are figures in the table, not failures)
"$PY" benchmarks/bench_gpu.py summary "$OUT" >"$OUT/summary.txt"
rc=$?
cat "$OUT/summary.txt"
echo "total $(( SECONDS - START )) s; logs and JSON in $OUT"
exit $rc
