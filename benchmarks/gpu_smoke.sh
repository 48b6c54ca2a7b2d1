#!/usr/bin/env bash
# GPU smoke test (about 2 minutes on one H200 after start-up; a first, larger version did not finish in 520 s): a
# synthetic ImageNet-shaped root of real JPEGs, then JSON lines in
# OUT/gpu_smoke.jsonl:
#   1. train_throughput: ViT-B/16 rows/s, plain timm loop vs aMINT vs our loop with mint.mode=off (--decompose),
#      single process, bf16 (train.precision=auto on a bf16 GPU), synthetic tensors (no data loading)
#   2. gpu_smoke_run: ViT-L/16 on the root at a small batch with and without train.grad_checkpointing: peak
#      memory (torch.cuda.max_memory_allocated), the compute dtype the engine asserted (docs/distributed.md)
#   3. the same under DeepSpeed ZeRO-2 (one process) when `import deepspeed` works; else a line saying so
# Usage: benchmarks/gpu_smoke.sh [OUT]   (default: $OUT, else ./gpu_smoke_out)
#   SMOKE_TINY=1   everything tiny (a tiny ViT, 32 px, 240 images, a few steps): proves the script on a CPU
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-${OUT:-$PWD/gpu_smoke_out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/gpu_smoke.jsonl
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$REPO"

if [[ ${SMOKE_TINY:-0} == 1 ]]; then
  images=(--count 240 --size 32 --classes 4)
  shard=12
  bench=(--models vit_digits --rounds 1 --steps 2 --warmup 1)
  small=(model.name=vit_tiny_patch16_224 model.img_size=32 model.kwargs.patch_size=8 model.kwargs.embed_dim=32
         model.kwargs.depth=2 model.kwargs.num_heads=2 "mint.taps=[0,1]" mint.head.hidden=16 train.batch_size=4
         data.workers=0 train.max_steps=2)
  large=("${small[@]}")
  base=("${small[@]}")
else
  images=(--count 320 --size 224 --classes 8)
  shard=10
  bench=(--models vit_b16 --rounds 4 --steps 10 --warmup 3)
  large=(experiment=vit_l16_imagenet train.batch_size=8 data.workers=2 train.max_steps=6)
  base=(experiment=vit_b16_imagenet train.batch_size=32 data.workers=2 train.max_steps=6)
fi
common=(train.log_every=1 train.ckpt_every_epochs=0 run.audit=false train.precision=auto)

stamp() { echo "[gpu_smoke $(date +%T)] $*"; }

stamp "writing JPEGs and preparing the root"
python benchmarks/smoke_tools.py images "$WORK/images" "${images[@]}"
python launch/prepare_data.py data=imagefolder "data.source=$WORK/images" "data.root=$WORK/root" \
  "data.shard_maxcount=$shard" data.prepare_workers=4

stamp "ViT-B/16 throughput: plain vs aMINT vs mint.mode=off"
python benchmarks/train_throughput.py "${bench[@]}" --decompose --threads 0 --tmp "$WORK/bench" --results "$RESULTS"

# train_run NAME LAUNCHER... -- OVERRIDES...: a short run on the root, summarised into one JSON line
train_run() {
  local name=$1 launcher=()
  shift
  while [[ $1 != -- ]]; do launcher+=("$1"); shift; done
  shift
  stamp "training run $name"
  "${launcher[@]}" launch/train.py "run.dir=$WORK/$name" "data.root=$WORK/root" "${common[@]}" "$@" \
    >"$OUT/$name.log" 2>&1 || { stamp "$name failed (log: $OUT/$name.log)"; tail -n 20 "$OUT/$name.log"; return 1; }
  python benchmarks/smoke_tools.py summary "$WORK/$name" "$OUT/$name.log" --name "$name" --results "$RESULTS" \
    --fact "overrides=$*"
}

train_run vit_l16_ckpt_off python -- "${large[@]}" train.grad_checkpointing=false
train_run vit_l16_ckpt_on python -- "${large[@]}" train.grad_checkpointing=true

if python -c "import deepspeed" >/dev/null 2>&1; then
  train_run vit_b16_zero2 python -m accelerate.commands.launch --config_file configs/accelerate/deepspeed_zero2.yaml \
    --num_processes 1 -- "${base[@]}"
else
  stamp "DeepSpeed parts skipped: import deepspeed failed"
  echo '{"benchmark": "gpu_smoke_deepspeed", "skipped": "import deepspeed failed"}' | tee -a "$RESULTS"
fi
stamp "done: $RESULTS"
