#!/bin/bash
# The GPU measurements issue 12 waits for, as one prepared device command (one H100/H200 of
# ../shared/gpu/README.md; ~8-9 minutes, most of it compilation). Results land under $OUT (or ./gpu_out).
#
#   on the development machine, once:  bash ../shared/gpu/wheels.sh          (writes .whl/)
#   then, through the device tool:     bash benchmarks/gpu_issue12.sh attention model_step   (carry: [".whl"])
#                                 and:     bash benchmarks/gpu_issue12.sh engine                 (a second call)
# (each call stays under the device tool's 10 minutes; compiling Swin-B three times takes most of the second)
#
# 1. benchmarks/attention.py: sdpa / flex vs the math path on Swin-B's stage shapes, forward and backward
#    in fp32 (max relative difference, tolerance 1e-4), then fwd+bwd time per impl in bf16 and fp32.
# 2. benchmarks/model_step.py: the bare compiled bf16 step at batch 128, ours (sdpa, flex) vs timm.
# 3. benchmarks/engine_step.py: engine vs the plain compiled loop vs timm's model in it, Swin-B, micro 128,
#    14 loader workers, the full recipe's augmentation, on generated 500x375 photos.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD TORCHINDUCTOR_CACHE_DIR=/tmp/inductor OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c 'import torch, timm; print(torch.__version__, torch.version.cuda, timm.__version__)' >> "$OUT/gpu.txt"

PARTS=" ${*:-attention model_step engine} "
if [[ $PARTS == *" attention "* ]]; then
timeout 120 python3 benchmarks/attention.py --batch 128 --json "$OUT/attention.jsonl" > "$OUT/attention.log" 2>&1
echo "attention rc=$?" >> "$OUT/status.txt"
fi
if [[ $PARTS == *" model_step "* ]]; then

timeout 360 python3 benchmarks/model_step.py --device cuda --variants swin_base --dtypes bf16 --batch 128 \
  --compile yes --attn-impl sdpa flex --steps 20 --warmup 5 --json "$OUT/model_step.jsonl" > "$OUT/model_step.log" 2>&1
echo "model_step rc=$?" >> "$OUT/status.txt"
fi
if [[ $PARTS == *" engine "* ]]; then

python3 - > "$OUT/data.log" 2>&1 <<'EOF'
import os
from multiprocessing import Pool
from benchmarks.data_throughput import make_photos
def part(i):  # 300 photos in 10 classes per process, then merged into /tmp/photos/cK/
    make_photos(f"/tmp/parts/p{i}", 300, (500, 375), classes=10)
    for c in os.listdir(f"/tmp/parts/p{i}"):
        os.makedirs(f"/tmp/photos/{c}", exist_ok=True)
        for f in os.listdir(f"/tmp/parts/p{i}/{c}"):
            os.rename(f"/tmp/parts/p{i}/{c}/{f}", f"/tmp/photos/{c}/p{i}_{f}")
with Pool(16) as p:
    p.map(part, range(16))
EOF
python3 -m pretrain.cli.make_shards write /tmp/photos /tmp/shards --workers 16 --samples-per-shard 500 --no-progress >> "$OUT/data.log" 2>&1
INFO=$(ls /tmp/shards/_info.json)
timeout 480 deepspeed --num_gpus 1 benchmarks/engine_step.py speed --shards "$INFO" --variant swin_base --img 224 \
  --window 7 --classes 21841 --micro 128 --compile true --workers 14 --timm --steps 12 --warmup 3 --rounds 2 \
  --run-dir /tmp/engine_bench --json "$OUT/engine_step.jsonl" > "$OUT/engine_step.log" 2>&1
echo "engine_step rc=$?" >> "$OUT/status.txt"
fi
cat "$OUT/status.txt"
