"""Pretrain the Darknet backbone on ImageNet with DistributedDataParallel, under torchrun.

    torchrun --nproc_per_node=8 darknet_train_multigpu_distr.py --train-dir /data/imagenet/train
    # two machines (run on each; host0 runs the rendezvous; the run folder on shared storage):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=host0:29400 \\
        --rdzv-id=darknet darknet_train_multigpu_distr.py --name imagenet --auto-resume ...

One process per GPU (per CPU process with --device cpu, over gloo): each keeps its own
copy of the model and reads its own shard of every epoch, and the gradients are averaged
during the backward pass (NCCL between GPUs); main() below lists what else changes.
--batch-size is the total over all processes, so the same arguments give the same
training on any number of GPUs (up to batch norm, which normalises each process's share
of the batch). Validation counts are summed over the ranks, so every rank gets the same
top-1 and top-5.

A process that dies ends the group. With torchrun --max-restarts=N and --auto-resume the
group starts again and continues from the run's last.pt (every node must see the run
folder: shared storage; this is checked). Recent torchrun needs
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for restarts to connect (pytorch/pytorch#167288):

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nproc_per_node=8 --max-restarts=3 \\
        darknet_train_multigpu_distr.py --name imagenet --auto-resume ...

Started without torchrun it trains in one process, as darknet_train.py does. Arguments,
run folders and checkpoints are those of darknet_train.py.
"""
from __future__ import annotations

import os

from torch.nn.parallel import DistributedDataParallel

import distributed
from classification import build_datasets, build_model, parse_args, train
from utils import run_cli


def main(argv=None):
    args = parse_args(argv, __doc__)
    # init_process_group, one process per device: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK
    dist = distributed.setup_distributed(args.device)
    try:
        train_set, val_set = build_datasets(args)
        model = build_model(args, len(train_set.classes), dist.device)
        if dist.distributed:
            # DDP copies rank 0's weights to every rank, then all-reduces gradient buckets during
            # backward, overlapped with the computation.
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        else:
            why = "WORLD_SIZE is 1" if "WORLD_SIZE" in os.environ else "not started by torchrun"
            print(f"note: {why}, so this trains in one process, as darknet_train.py does", flush=True)
        # The rest that several processes need happens in the shared loop, keyed on dist:
        # - the sampler: each rank reads its own shard of every epoch (distributed.EpochSampler,
        #   which engine.fit reshuffles with set_epoch(epoch), as DistributedSampler's);
        # - rank 0 alone prints, logs and saves checkpoints (dist.is_main in engine.fit);
        # - the reductions: epoch losses and validation counts are summed over the ranks
        #   (distributed.reduce_sums), batch-norm statistics come from rank 0 (sync_buffers).
        train(args, dist, model, train_set, val_set)
    finally:
        distributed.cleanup_distributed()  # destroy_process_group


if __name__ == "__main__":
    run_cli(main)
