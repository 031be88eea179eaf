#!/usr/bin/env bash
# Every GPU measurement in BENCHMARKS.md, in one go (parts 1-4 about 4 minutes on an H100, part 5
# 6-8 more; machine start not counted):
#
#     bash bench/gpu_suite.sh                 # results in bench/results/gpu/
#     OUT=/somewhere bash bench/gpu_suite.sh
#     QUICK=1 DEVICE=cpu bash bench/gpu_suite.sh   # the plumbing, on a CPU, in a minute or two
#     PARTS="2 3" bash bench/gpu_suite.sh          # only some of the parts below
#     PARTS="6 3 5" bash bench/gpu_suite.sh        # what #16 still needs, in this order: 8-10 minutes
#                                                  # (parts 1, 2, 4 were measured: BENCHMARKS.md section 5)
#     DETECT_ARGS="--variants eager,default --rounds 20" PARTS=5 bash bench/gpu_suite.sh   # a shorter part 5
#
# 1. bench_train.py: YOLOv1@448 (batch 64) and Darknet@224 (batch 128) training steps in
#    float32, bf16 autocast, + channels_last, + torch.compile, and fused SGD; peak memory.
# 2. bench_data.py: DataLoader images/s with 4 to 14 workers on the host's cores.
# 3. train.py end to end on 6,400 VOC-sized synthetic JPEGs (augmentation on), bf16 +
#    channels_last + --compile, 14 workers: epoch 2's images/s is what a VOC epoch gets;
#    with --decode device (nvJPEG + augmentation on the GPU) and host (DECODES to choose).
# 4. Smoke runs of the GPU-only paths: DDP over NCCL (torchrun), DataParallel's script, AMP.
# 5. bench_detect.py: detection frames per second, JPEG file to boxes and the network alone, batch
#    1 and 256, YOLOv1 and Fast YOLO: float32 eager, channels_last, batch norm folded, torch.compile
#    (CUDA graphs), float16, bfloat16, onnxruntime-gpu when installed; every variant's boxes
#    against eager float32's. About 6-8 minutes (the CUDA-graph compilations take most of it).
# 6. bench_eval.py: test.py end to end on 4,952 VOC-sized JPEGs (YOLOv1): host decode, nvJPEG
#    decode, float16, float16 + CUDA graphs; boxes against the host-decode float32 run's.
# Each step has its own time limit, so one failure does not cost the others.
set -u
OUT=${OUT:-bench/results/gpu}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
PARTS=${PARTS:-1 2 3 4 5 6}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
log() { echo "=== $* ($(date +%T))"; }

log machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cpus', __import__('os').cpu_count())"

part_1() {
log "1. training step"
if [ -n "$QUICK" ]; then TRAIN_ARGS="--quick --all-variants"; else TRAIN_ARGS=""; fi
timeout 300 python bench/bench_train.py --device "$DEVICE" --fused-sgd $TRAIN_ARGS --json "$OUT/train.json"
}

part_2() {
log "2. data loading"
if [ -n "$QUICK" ]; then DATA_ARGS="--images 8 --files 100 --workers 0,2 --batch 8 --batches 2 --repeats 2"
else DATA_ARGS="--images 40 --files 2000 --workers 4,8,14 --batch 64 --batches 24 --repeats 3"; fi
timeout 100 python bench/bench_data.py $DATA_ARGS --json "$OUT/data.json"
}

part_3() {
log "3. train.py end to end"
if [ -n "$QUICK" ]; then E2E="--model fast --width 0.0625 --S 2 --batch-size 8 --workers 2"; N=32
else E2E="--batch-size 64 --workers 14 --compile"; N=6400; fi
python - "$WORK/voc" "$N" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
import synthetic
root, n = Path(sys.argv[1]), int(sys.argv[2])
csv = synthetic.write_voc_txt_tree(root, 64, size=(500, 375), seed=0)
lines = csv.read_text().splitlines()
body = lines[1:]  # header, then image,label rows: repeat them to n rows
csv.write_text("\n".join([lines[0]] + [body[i % len(body)] for i in range(n)]) + "\n")
print(f"{n} rows over {len(body)} JPEGs in {csv}")
EOF
for DEC in ${DECODES:-device host}; do
echo "--- --decode $DEC"
timeout 150 python train.py --recipe paper --data "$WORK/voc/train.csv" --epochs 2 --device "$DEVICE" \
    --channels-last --lr 1e-4 --skip-nonfinite --decode $DEC $E2E --project "$WORK/runs" --name e2e_$DEC 2>&1 \
    | tr '\r' '\n' | grep -v '%|' | grep -v '^ *$' | tail -8
cp "$WORK/runs/e2e_$DEC/metrics.jsonl" "$OUT/e2e_${DEC}_metrics.jsonl" && cat "$OUT/e2e_${DEC}_metrics.jsonl"
done
timeout 60 python test.py "$WORK/runs/e2e_host/last.pt" --data data/val.csv --device "$DEVICE" 2>&1 | tail -3
}

part_4() {
log "4. smoke: DDP (torchrun, NCCL on a GPU), DataParallel script, AMP"
SMALL="--width 0.125 --img-size 96 --batch-size 16 --epochs 2 --device $DEVICE --workers 2 --channels-last"
timeout 60 torchrun --standalone --nproc-per-node 1 darknet_train_multigpu_distr.py $SMALL \
    --project "$WORK/runs" --name ddp 2>&1 | tr '\r' '\n' | grep -v '%|' | grep -v '^ *$' | tail -3
if [ "$DEVICE" = cuda ]; then timeout 60 python - <<'NCCL'
# One GPU cannot hold two NCCL ranks, and torchrun with one process trains without DDP:
# this checks the NCCL collectives distributed.py uses, and a DDP step, in a world of one.
import os, sys
import torch, torch.distributed as td
sys.path.insert(0, ".")
import distributed
from darknet_model import Darknet
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1")
td.init_process_group("nccl")
dev = torch.device("cuda", 0)
model = torch.nn.parallel.DistributedDataParallel(Darknet(10, width=0.125).to(dev), device_ids=[0])
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = torch.nn.functional.cross_entropy(model(torch.rand(8, 3, 96, 96, device=dev)).float(),
                                             torch.randint(0, 10, (8,), device=dev))
loss.backward()
fake = distributed.Dist(0, 2, 0, dev)  # world_size 2 makes reduce_sums/all_ranks use the collectives
print("NCCL ok:", distributed.reduce_sums({"a": 2.0, "b": 3.0}, fake), distributed.all_ranks(True, fake),
      "grad finite:", all(torch.isfinite(p.grad).all().item() for p in model.parameters()))
td.destroy_process_group()
NCCL
fi
timeout 60 python darknet_train_multigpu.py $SMALL --project "$WORK/runs" --name dp 2>&1 | tr '\r' '\n' | grep -v '%|' | grep -v '^ *$' | tail -3
}
part_5() {
log "5. detection speed"
if [ -n "$QUICK" ]; then DETECT_ARGS="--quick"; else
DETECT_ARGS=${DETECT_ARGS:-"--models yolov1,fast,yolov1-tiny --variants eager,default,compile,float16,bfloat16,float16-compile,onnx --budget 10"}; fi
timeout 540 python bench/bench_detect.py --device "$DEVICE" $DETECT_ARGS --json "$OUT/detect.json"
}
part_6() {
log "6. test.py end to end (4,952 images)"
if [ -n "$QUICK" ]; then EVAL_ARGS="--quick"; else EVAL_ARGS=""; fi
timeout 300 python bench/bench_eval.py --device "$DEVICE" $EVAL_ARGS --json "$OUT/eval.json" 2>&1 | grep -v '%|'
}
# the parts in the order PARTS names them (the most wanted first, if time may run out)
for p in $PARTS; do
    declare -F "part_$p" > /dev/null || { echo "no part $p"; continue; }
    "part_$p"
done
log done
rm -rf "$WORK"
