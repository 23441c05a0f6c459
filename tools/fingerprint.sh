#!/usr/bin/env bash
# sha256 of what short fixed-seed runs write, one thread: the proof that a restructuring changed
# no output. Run it before and after a change and diff the two lists.
#
#   bash tools/fingerprint.sh /tmp/fp-before > before.txt
#   ... change the code ...
#   bash tools/fingerprint.sh /tmp/fp-after > after.txt && diff before.txt after.txt
#
# Covers every objective (SI + dispersive on all blocks, StableVM with its bank, MeanFlow +
# dispersive, restricted-noise contrastive), every sampler (ODE with CFG, SDE, 1-step MeanFlow)
# and the digits metric's JSON. Takes a few minutes on 2 cores.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: fingerprint.sh OUT_DIR}")
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONHASHSEED=0
rm -rf "$OUT"
mkdir -p "$OUT"
D=$OUT/data
log=$OUT/commands.log

run() { echo "+ $*" >> "$log"; "$@" >> "$log" 2>&1; }

run python preprocessing/encode.py --source digits --dest "$D" --resolution 8 --vae none \
  --shard-size 600 --num-workers 0
TRAIN=(python train.py --preset digits --data-dir "$D" --output-dir "$OUT/runs" --seed 0
       --max-train-steps 6 --checkpointing-steps 3 --log-every 3 --num-workers 1)
run "${TRAIN[@]}" --exp-name si-disp --disp --disp-blocks all
run "${TRAIN[@]}" --exp-name stablevm --loss-type stablevm --bank-capacity-per-class 16
run "${TRAIN[@]}" --exp-name meanflow-disp --preset digits-meanflow --disp
run "${TRAIN[@]}" --exp-name contrastive --contrastive infonce_l2 --contrastive-noise restricted \
  --contrastive-delta 0.1 --disp-blocks all

GEN=(python generate.py --num-fid-samples 40 --label-sampling equal --per-proc-batch-size 16
     --global-seed 1)
run "${GEN[@]}" --ckpt "$OUT/runs/si-disp" --mode ode --num-steps 8 --cfg-scale 3 \
  --sample-dir "$OUT/gen/ode-cfg"
run "${GEN[@]}" --ckpt "$OUT/runs/stablevm" --mode sde --num-steps 8 \
  --sample-dir "$OUT/gen/sde"
run "${GEN[@]}" --ckpt "$OUT/runs/meanflow-disp" --mode meanflow --num-steps 1 \
  --sample-dir "$OUT/gen/meanflow-1"
# from inside OUT: the metric JSON records the samples path, which must not name OUT
REPO=$PWD
(cd "$OUT" && run python "$REPO/evaluate.py" digits gen/ode-cfg/samples.npz --json digits.json)

cd "$OUT"
sha256sum data/shard-*.safetensors data/manifest.json \
  runs/*/ema.safetensors runs/*/checkpoints/step-0000006/model.safetensors \
  runs/stablevm/checkpoints/step-0000006/bank-0.safetensors \
  gen/*/samples.npz digits.json | sed 's#  #  #'
