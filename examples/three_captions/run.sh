#!/usr/bin/env bash
# The three-caption-set workflow end to end, offline, on the shipped data (run from the repository root):
#   1. caption the quickstart's star images twice with the shapes world's captioner: tags (the WD14 role) and
#      sentences (the Kosmos-2 role);
#   2. caption-sets: 10_empty/ (empty captions), 10_wd/ (tags), 10_kosmos/ (sentences);
#   3. train the quickstart's LoRA on builtin:mini at the same 800 steps (config.toml);
#   4. judge it beside the single-caption quickstart (judge.py: star rate and prior, docs/quality.md).
# With real photos, step 1 is `--captioner wd14` and `--captioner kosmos2` (docs/tools.md).
set -euo pipefail
OUT=output/three_captions
STARS=examples/quickstart/data/10_star
THREADS=${THREADS:-1}

lora-diffusion caption "$STARS" --captioner world --style tags --output_dir "$OUT/captions/wd" --overwrite
lora-diffusion caption "$STARS" --captioner world --style sentence --output_dir "$OUT/captions/kosmos" --overwrite
lora-diffusion caption-sets "$STARS" "$OUT/data" --set empty=empty --set wd="$OUT/captions/wd" \
    --set kosmos="$OUT/captions/kosmos" --repeats 10 --overwrite

python train_lora.py --config_file examples/three_captions/config.toml --threads "$THREADS"
if [ ! -f "$OUT/quickstart/quickstart.safetensors" ]; then   # the single-caption baseline, same steps
    python train_lora.py --config_file examples/quickstart/config.toml --output_dir "$OUT/quickstart" \
        --logging_dir "$OUT/quickstart/logs" --threads "$THREADS"
fi
python examples/three_captions/judge.py --threads "$THREADS" \
    "quickstart=$OUT/quickstart/quickstart.safetensors" "three sets=$OUT/lora/three_captions.safetensors"
