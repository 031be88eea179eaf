"""Where a process runs and what it is among its peers: the device, the process group
under torchrun, the samplers that give each process its shard of an epoch, and the
collectives (sums, agreement, gradient averages) the training loop needs.

Everything that talks to other processes is here, so a script run alone never touches
torch.distributed: with ``world_size`` 1 each helper does the single-process thing.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader

from utils import UserError, one_line


# --------------------------------------------------------------------------- devices and processes
@dataclass
class Dist:
    """Where this process runs and what it is among its peers (world_size 1 if alone)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: not a device name: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def setup_distributed(device_arg: str = "auto") -> Dist:
    """One process per device under ``torchrun``; a plain single process otherwise.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. NCCL carries the gradients between
    GPUs, gloo between CPU processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(device=resolve_device(device_arg))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        warn_if_restarted_on_shared_store(rank)
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def warn_if_restarted_on_shared_store(rank: int) -> None:
    """torchrun --max-restarts: recent torchrun hands restarted workers the store of the
    first attempt, whose stale addresses keep the new process group from connecting
    (pytorch/pytorch#167288). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each attempt its own."""
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if restarted and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and rank == 0:
        print("warning: torchrun restarted the workers on the store of its first attempt; if they "
              "fail to connect, start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
              "(pytorch/pytorch#167288)", file=sys.stderr, flush=True)


def cleanup_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel."""
    return model.module if hasattr(model, "module") else model


def amp_dtype(args, device: torch.device):
    """float16 on CUDA (bfloat16 where supported), nothing on CPU unless asked for."""
    if args.amp == "off" or (args.amp == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


# --------------------------------------------------------------------------- data loaders
class EpochSampler(torch.utils.data.Sampler):
    """This process's indices for one epoch, from any position in it.

    The order follows from (seed, epoch) alone; under DDP each of the world_size processes
    takes every world_size-th index of it, padded to equal shares as DistributedSampler
    does. ``start`` skips the samples already trained when a run resumes mid-epoch.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world_size
        self.epoch, self.start = 0, 0
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[:self.per_rank * self.world - self.n]
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


class SeededDataset(torch.utils.data.Dataset):
    """Each sample's random augmentation follows from (seed, epoch, index) alone.

    It then does not depend on which worker loads the sample, on how many workers
    there are, or on whether the run was interrupted and resumed.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1000003 + self.epoch) * 10000019 + index) % 2**63)
            return self.dataset[index]


def make_loader(dataset, batch_size: int, train: bool, workers: int, dist: Dist,
                seed: int, collate_fn=None) -> DataLoader:
    """A training loader whose batches depend only on (seed, epoch): see set_epoch.

    Under DDP each process reads its own shard of a per-process batch of
    ``batch_size / world_size``. The loader has a generator of its own: without one, each
    epoch's iterator draws its base seed from the global RNG, which a run resumed in the
    middle of an epoch would draw once more than the uninterrupted run (other dropout masks).
    """
    batch_size = max(1, batch_size // dist.world_size)
    sampler = EpochSampler(len(dataset), train, seed, dist.rank, dist.world_size)
    return DataLoader(SeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                      num_workers=workers, pin_memory=dist.device.type == "cuda", drop_last=False,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Select ``epoch``'s order and augmentation, starting after ``start_batch`` batches."""
    loader.sampler.set_epoch(epoch, start_batch * loader.batch_size)
    loader.dataset.epoch = epoch


# --------------------------------------------------------------------------- collectives
def reduce_sums(values: dict[str, float], dist: Dist) -> dict[str, float]:
    """Sum each value over all processes, so every rank sees the same totals."""
    if not dist.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=dist.device if dist.device.type == "cuda" else "cpu")
    torch_dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_ranks(flag: bool, dist: Dist) -> bool:
    """True on every rank if ``flag`` is true on every rank."""
    t = torch.tensor([float(flag)], device=dist.device if dist.device.type == "cuda" else "cpu")
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
    return bool(t.item())


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not dist.distributed:
        return flag
    t = torch.tensor([flag], dtype=torch.float32, device=dist.device if dist.device.type == "cuda" else "cpu")
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def agree_on_error(error: str | None, dist: Dist) -> str | None:
    """The first rank's error message (None if no rank has one), on every rank.

    A rank that raised alone would leave the others waiting in their next collective
    (NCCL: until its timeout; gloo: a traceback when the dead peer's socket closes) with
    nothing saved. Each rank instead reports its outcome here, at a point every rank
    reaches, and all of them stop together: no timeout is involved. One all-reduce when
    nothing failed; the messages travel only when something did.
    """
    if not dist.distributed or not any_rank(error is not None, dist):
        return error
    return next(e for e in gather_objects(error, dist) if e is not None)


def agreed_batches(loader, dist: Dist):
    """The batches of ``loader``, each one released only when every rank has fetched its
    own: a bad file on any rank (a truncated JPEG is found only when it is decoded) raises
    its one-line UserError on every rank, before the step whose collectives would wait for
    that rank. The ranks' loaders have equal lengths (EpochSampler pads), so they end together."""
    iterator = iter(loader)
    while True:
        try:
            batch, error = next(iterator), None
        except StopIteration:
            return
        except UserError as err:
            batch, error = None, one_line(err)
        error = agree_on_error(error, dist)
        if error is not None:
            raise UserError(error)
        yield batch


def gather_results(work, dist: Dist) -> list:
    """``work()``'s result of every rank, in rank order, on every rank (validation of each
    rank's shard). A UserError on any rank (a bad image in its shard) is raised on every
    rank once all have finished: the shards differ in length, so the ranks meet only here."""
    try:
        result, error = work(), None
    except UserError as err:
        if not dist.distributed:
            raise
        result, error = None, one_line(err)
    parts = gather_objects((result, error), dist)
    errors = [e for _, e in parts if e is not None]
    if errors:
        raise UserError(errors[0])
    return [r for r, _ in parts]


def gather_objects(obj, dist: Dist) -> list:
    """Every rank's ``obj`` (any picklable value), in rank order, on every rank."""
    if not dist.distributed:
        return [obj]
    gathered = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, dist: Dist):
    """Rank 0's ``obj`` (any picklable value), on every rank."""
    if not dist.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_partial(partial: dict, dist: Dist) -> dict:
    """An interrupted epoch's running sums over every rank, for rank 0 to save: each rank
    saw its own images, and a resume on any number of processes must count each once
    (saving rank 0's alone counted 14 of 16 images when 2 processes resumed as 1).
    Skipped steps and the time are the same on every rank and stay as they are."""
    parts = gather_objects({"sums": partial["sums"], "seen": partial["seen"]}, dist)
    sums = {}
    for part in parts:
        for k, v in part["sums"].items():
            sums[k] = sums.get(k, 0.0) + v
    return partial | {"sums": sums, "seen": sum(part["seen"] for part in parts)}


def share_of_partial(partial: dict | None, dist: Dist) -> dict | None:
    """This rank's start of a resumed epoch: rank 0 carries the saved sums of all ranks
    (merge_partial), the others start from none, so the epoch's reduction counts them once."""
    if partial is None or dist.is_main:
        return partial
    return partial | {"sums": {}, "seen": 0}


def average_gradients(model) -> None:
    """Average the accumulated gradients over the ranks by hand. DDP does it in the backward
    pass of a step's last micro-batch; when --skip-nonfinite skipped that one (on every rank
    at once), the earlier micro-batches' gradients (under ``no_sync``) are still each rank's
    own, and stepping on them would let the ranks' weights drift apart."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        world = torch_dist.get_world_size()
        for grad in grads:
            torch_dist.all_reduce(grad)
            grad.div_(world)


def sync_buffers(model: torch.nn.Module, dist: Dist) -> None:
    """Give every rank rank 0's batch-norm statistics.

    DDP keeps the weights equal (it averages the gradients), but it broadcasts the
    buffers only at the start of each forward pass, so after the last step each rank's
    running mean and variance follow its own last batch. Rank 0's are the ones saved;
    with them every rank validates, and goes on training, the model in the checkpoint.
    """
    if dist.distributed:
        for buffer in model.buffers():
            torch_dist.broadcast(buffer, src=0)
