"""The training loop, in reading order: what one process does with a run's model and data.

    Processes, precision    this process's rank among torchrun's, its device, its autocast dtype
    make_optimizer ...      the optimizer, loss scaling, schedule, and one optimizer step
    TrainingState           what the loop carries and a checkpoint saves
    batch_indices           this process's share of each global batch
    train_epoch, evaluate   one pass over a split: its exact loss and perplexity
    Trainer                 fit (the epochs left, checkpoints after each) and test

The loop raises (TrainingStopped, an OSError, a signal's KeyboardInterrupt) and records nothing;
the run's life cycle around it, and the status its log ends with, is utils/experiment.py.
Perplexities are exact: exp(summed NLL over every real target token of a split / their number).
"""
import contextlib
import dataclasses
import math
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from utils.batch_loss import BatchLoss
from utils.checkpoint import read_checkpoint, restore_rng_state, save_checkpoint
from utils.cli import UsageError, resolve_device
from utils.config import ExperimentConfig
from utils.cpu_autocast import cpu_autocast_refusal
from utils.language_model import perplexity
from utils.torch_utils import to_device, unwrap


class TrainingStopped(Exception):
    """The run could not go on (non-finite loss, out of memory): printed as one line, exit code 1."""

    exit_code = 1


# ----------------------------------------------------------------------------------------------
# Processes and precision


class Processes:
    """This process's place among the torchrun processes (one process: rank 0 of 1)."""

    def __init__(self, device=None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None and not torch.cuda.is_available() and self.main:
            print("warning: no CUDA device found: training on the CPU, which is slow "
                  "(--device cpu silences this warning)", file=sys.stderr)
        if device in (None, "cuda") and self.distributed and torch.cuda.is_available():
            device = f"cuda:{self.local_rank}"
        self.device = resolve_device(device)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def main(self):
        return self.rank == 0

    def say(self, message):
        """Print `message` from the main process only, so that a line is not printed once per rank."""
        if self.main:
            print(message)

    def sum(self, *values):
        """Sum float tensors over all processes (a no-op for one process)."""
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        if self.distributed:
            if self.device.type != "cuda":
                stacked = stacked.cpu()
            dist.all_reduce(stacked)
        return stacked.tolist()


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def native_bf16(device):
    """Whether a CUDA device computes bf16 in hardware: compute capability 8.0 (Ampere) or newer.

    `torch.cuda.is_bf16_supported()` also says yes where bf16 is only emulated (a T4, sm_75),
    which runs far slower than fp16 there.
    """
    return torch.cuda.get_device_capability(device) >= (8, 0)


def choose_precision(config, device):
    """`(name, reason)`: the precision a run computes in ("bf16", "fp16" or "fp32") and why.

    A precision asked for explicitly always wins. "auto" gives fp32 on the CPU and on the reference
    path (the course's fp32 path), bf16 on GPUs with native bf16, and fp16 with dynamic loss scaling
    on older ones.
    """
    if config.precision != "auto":
        return config.precision, f"--precision {config.precision}"
    if device.type != "cuda":
        return "fp32", f"--precision auto on {device.type}"
    if not config.fused:
        return "fp32", "--precision auto on the reference path (--no_fused)"
    major, minor = torch.cuda.get_device_capability(device)
    if native_bf16(device):
        return "bf16", f"--precision auto: sm_{major}{minor} computes bf16 natively"
    return "fp16", f"--precision auto: sm_{major}{minor} has no native bf16, so fp16 with loss scaling"


def resolve_precision(config, device):
    """The autocast dtype of `choose_precision` (None: no autocast, fp32)."""
    return AUTOCAST_DTYPES[choose_precision(config, device)[0]]


def check_precision(config, device):
    """Refuse, in one line, a precision the device cannot run for this model: on the CPU, autocast
    runs only where the CPU's kernels can, which the probe of utils/cpu_autocast.py finds out."""
    precision = choose_precision(config, device)[0]
    if device.type == "cpu" and precision != "fp32":
        refusal = cpu_autocast_refusal(precision, config.model)
        if refusal:
            raise UsageError(f"--precision {precision}: {refusal}; use --precision fp32")


# ----------------------------------------------------------------------------------------------
# Optimizer, loss scaling, schedule


def make_optimizer(config, parameters):
    """The optimizer named by `config.optimizer` (see the table in README.md).

    On the fused path it is PyTorch's fused kernel, on the CPU too: one kernel for all the
    parameters instead of several operations per parameter. Where a device has no fused kernel,
    PyTorch's default implementation is used.
    """
    def build(**fused):
        if config.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=config.lr, **fused)
        if config.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, **fused)
        if config.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=config.lr, weight_decay=config.weight_decay, **fused)
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, **fused)

    parameters = list(parameters)
    if config.fused:
        try:
            return build(fused=True)
        except RuntimeError:  # "`fused=True` requires ... Tensors of supported devices"
            pass
    return build()


def make_grad_scaler(config, device):
    """Dynamic loss scaling, on whenever autocast is.

    CUDA autocast runs cuDNN's LSTM in fp16 whatever autocast's dtype, and fp16 gradients of the
    size this loss gives lose their precision or vanish without scaling. For bf16 alone scaling
    is harmless (bf16 has fp32's range) and, with fused optimizers, costs no sync.
    """
    return torch.amp.GradScaler(device.type, enabled=resolve_precision(config, device) is not None)


def make_scheduler(config, optimizer, steps_per_epoch):
    """Cosine decay over the whole run with `--scheduler cosine`; None (a constant rate) otherwise."""
    if config.scheduler == "cosine":
        total = config.max_steps or config.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    return None


def optimizer_step(loss, optimizer, scaler, learnable, clip_grad_norm=None):
    """Backward pass, optional clipping of the true gradients, and the optimizer's step.

    With scaling, a step whose gradients overflowed is skipped and the scale lowered.
    """
    scaler.scale(loss).backward()
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(learnable, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()


# ----------------------------------------------------------------------------------------------
# What the loop carries


@dataclasses.dataclass
class TrainingState:
    """What the loop carries and a checkpoint saves: the model, how it learns, and how far it got."""

    config: ExperimentConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: Optional[object] = None
    steps: int = 0  # optimizer steps taken, over all epochs
    epochs: list = dataclasses.field(default_factory=list)  # the log's entries of finished epochs
    best: Optional[dict] = None  # {"epoch", "valid_loss", "valid_ppl"} of the best epoch so far

    @property
    def epoch(self):
        """The number of finished epochs."""
        return len(self.epochs)

    def save(self, path):
        """Write the whole state as a checkpoint: enough to continue the run from it."""
        save_checkpoint(path, self.config, self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, epoch=self.epoch, steps=self.steps,
                        state={"epochs": self.epochs, "best": self.best}, grad_scaler=self.scaler)

    def restore(self, payload):
        """Continue from a checkpoint's payload: weights, optimizer, schedule, scaling, RNG, counts."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload.get("scheduler"):
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler.is_enabled() and payload.get("grad_scaler"):  # absent: saved without scaling
            self.scaler.load_state_dict(payload["grad_scaler"])
        restore_rng_state(payload["rng"])
        self.steps = payload["steps"]
        self.epochs = list(payload["state"].get("epochs", []))
        self.best = payload["state"].get("best")


# ----------------------------------------------------------------------------------------------
# Batches


def batch_indices(count, batch_size, processes, epoch=None, seed=0, limit=None):
    """The example indices of this process's share of each global batch.

    With `epoch` given the order is a permutation seeded by `(seed, epoch)`, so that a resumed
    epoch sees the same batches; without it (evaluation) the order is the natural one. Each global
    batch of `batch_size` is cut into `world_size` contiguous parts, one per process.

        global batch   [ 7 2 9 4 | 0 5 3 8 ]   batch_size 8, world_size 2
        process 0       7 2 9 4
        process 1                  0 5 3 8
    """
    if epoch is None:
        order = torch.arange(count)
    else:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(count, generator=generator)
    batches = list(order.split(batch_size))
    if limit is not None:
        batches = batches[:limit]
    return [(torch.tensor_split(batch, processes.world_size)[processes.rank], batch) for batch in batches]


def shares_on_device(batches, device):
    """Each batch's share of example indices (from `batch_indices`) on `device`, in one copy.

    A copy per step from pageable host memory would make the host wait for the GPU at every step,
    so that launching the next step's kernels could not overlap the current step's work.
    """
    shares = [share for share, _ in batches]
    if not shares:
        return []
    return list(torch.cat(shares).to(device).split([len(share) for share in shares]))


# ----------------------------------------------------------------------------------------------
# An epoch of training, an evaluation pass


def check_finite(nll, steps, split="training"):
    if not math.isfinite(nll):
        raise TrainingStopped(f"the {split} loss became {nll} at step {steps}: "
                              "lower --lr (or add --clip_grad_norm 1.0)")


def is_cpu_out_of_memory(error):
    """Whether `error` is PyTorch's (or Python's) refusal to allocate host memory."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error))


def out_of_memory_message(config, where="the CPU"):
    """What to change when `config` does not fit the memory of `where`."""
    return (f"out of memory on {where} at --batch_size {config.batch_size}, --sequence_length "
            f"{config.sequence_length}: lower them (or keep --precision auto and the fused path on)")


@contextlib.contextmanager
def out_of_memory_stops(config):
    """Within the block, running out of GPU or CPU memory raises TrainingStopped saying what to change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise TrainingStopped(out_of_memory_message(config, "the GPU")) from None
    except (RuntimeError, MemoryError) as error:
        if not is_cpu_out_of_memory(error):
            raise
        raise TrainingStopped(out_of_memory_message(config)) from None


def split_figures(processes, nll_sum, tokens, started):
    """Exact loss and perplexity of a pass from its summed NLL and token count, over all processes."""
    total_nll, total_tokens = processes.sum(nll_sum, tokens)
    seconds = time.perf_counter() - started
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "ppl": perplexity(loss), "tokens": int(total_tokens), "seconds": seconds,
            "tokens_per_second": total_tokens / seconds if seconds > 0 else None, "nll": total_nll}


def gpu_memory_mb(device):
    """`(MiB, source)`: the GPU's memory in use as nvidia-smi shows it (source "nvml").

    Without the NVML bindings (`nvidia-ml-py`) it is what PyTorch's allocator has reserved
    (source "torch_reserved"), which leaves out the CUDA context and so reads lower.
    """
    try:
        return torch.cuda.device_memory_used(device) / 2 ** 20, "nvml"
    except Exception:  # ModuleNotFoundError (pynvml), or NVML cannot be initialised
        return torch.cuda.memory_reserved(device) / 2 ** 20, "torch_reserved"


def train_epoch(batch_loss, state, data, batches, *, processes, progress=False, print_every=0,
                description="train"):
    """One epoch of training over `batches` (from `batch_indices`); returns its figures.

    `batch_loss` is a `BatchLoss` (possibly wrapped by DDP or torch.compile). The loss and
    perplexity are exact averages over the real tokens trained on, as trained.
    """
    batch_loss.train()
    device, config = processes.device, state.config
    present = data["mask"].sum(dim=1).cpu() > 0  # (N,) sequences that have a target
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    memory, started = [], time.perf_counter()
    bar = tqdm(batches, desc=description, disable=not (progress and processes.main),
               dynamic_ncols=True, leave=False)
    learnable = [p for p in unwrap(batch_loss).parameters() if p.requires_grad]
    on_device = shares_on_device(batches, device)
    for index, (_, global_batch) in enumerate(bar):
        if config.max_steps is not None and state.steps >= config.max_steps:
            break
        batch = {key: value.index_select(0, on_device[index]) for key, value in data.items()}
        sequences = int(present[global_batch].sum())  # the same count on every process
        state.optimizer.zero_grad(set_to_none=True)
        loss, batch_nll, batch_tokens = batch_loss(batch["source"], batch["target"], batch["mask"],
                                                   processes.world_size / max(sequences, 1))
        optimizer_step(loss, state.optimizer, state.scaler, learnable, config.clip_grad_norm)
        if state.scheduler is not None:
            state.scheduler.step()
        state.steps += 1
        nll_sum += batch_nll
        tokens += batch_tokens
        if index % 20 == 0 and device.type == "cuda":
            memory.append(gpu_memory_mb(device))
        if (index + 1) % (print_every or 50) == 0 or index == len(batches) - 1:
            # Syncs with the device, so only every print_every steps.
            running = split_figures(processes, nll_sum, tokens, started)
            check_finite(running["nll"], state.steps)
            if bar.disable and processes.main and print_every:
                print(f"  {description} step {index + 1}/{len(batches)}  loss {running['loss']:.4f}  "
                      f"{running['tokens_per_second'] or 0:,.0f} tokens/s", flush=True)
            bar.set_postfix(loss=f"{running['loss']:.3f}", tok_s=f"{running['tokens_per_second'] or 0:,.0f}")
    bar.close()
    figures = split_figures(processes, nll_sum, tokens, started)
    check_finite(figures["nll"], state.steps)
    return dict(figures, steps=state.steps, memory_samples=memory)


@torch.no_grad()
def evaluate(batch_loss, data, *, processes, batch_size, limit=None, progress=False, description="eval"):
    """A full deterministic pass over `data` in eval mode: exact loss and perplexity per token."""
    batch_loss.eval()
    device = processes.device
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    started = time.perf_counter()
    batches = batch_indices(len(data["source"]), batch_size, processes, limit=limit)
    module = unwrap(batch_loss)  # no gradients to synchronise: skip the DDP (and compile) wrapper
    for share in tqdm(shares_on_device(batches, device), desc=description,
                      disable=not (progress and processes.main), dynamic_ncols=True, leave=False):
        if len(share) == 0:
            continue
        batch = {key: value.index_select(0, share) for key, value in data.items()}
        _, batch_nll, batch_tokens = module(batch["source"], batch["target"], batch["mask"], 1.0)
        nll_sum += batch_nll
        tokens += batch_tokens
    return split_figures(processes, nll_sum, tokens, started)


def cpu_rss_mb():
    """This process's resident memory in MiB."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def epoch_entry(epoch, trained, validated, *, cumulative, lr, processes):
    """The log's entry for one finished epoch (see utils/data_utils.py)."""
    device = processes.device
    gpu = None
    if device.type == "cuda":
        samples = [mb for mb, _ in trained["memory_samples"]]
        sources = sorted({source for _, source in trained["memory_samples"]})
        gpu = {"steady": float(np.mean(samples)) if samples else None,
               "steady_source": "+".join(sources) or None,
               "peak_allocated": torch.cuda.max_memory_allocated(device) / 2 ** 20,
               "peak_reserved": torch.cuda.max_memory_reserved(device) / 2 ** 20}
    return {
        "epoch": epoch, "steps": trained["steps"],
        "train_loss": trained["loss"], "train_ppl": trained["ppl"],
        "valid_loss": validated["loss"], "valid_ppl": validated["ppl"],
        "train_seconds": trained["seconds"], "valid_seconds": validated["seconds"],
        "cumulative_seconds": cumulative, "train_tokens": trained["tokens"],
        "train_tokens_per_second": trained["tokens_per_second"],
        "valid_tokens_per_second": validated["tokens_per_second"],
        "lr": lr, "gpu_memory_mb": gpu, "cpu_rss_mb": cpu_rss_mb(),
    }


# ----------------------------------------------------------------------------------------------
# Fit and test


def wrap(batch_loss, config, processes):
    """TF32, torch.compile and DistributedDataParallel, as the config and processes ask."""
    device = processes.device
    if device.type == "cuda" and config.fused:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.compile:
        batch_loss = torch.compile(batch_loss)
    if processes.distributed:
        batch_loss = torch.nn.parallel.DistributedDataParallel(
            batch_loss, device_ids=[device.index] if device.type == "cuda" else None)
    return batch_loss


class Trainer:
    """The epochs of one run on this process: its data on the device, its loss module and state.

    `checkpoints` ({"last": path, "best": path}, or None) is where the main process saves the
    state after each epoch and where the test reads the best epoch's weights back; without it the
    best weights are kept in memory.
    """

    def __init__(self, config, processes, model, data, *, checkpoints=None, progress=False,
                 print_every=0):
        device = processes.device
        self.processes, self.checkpoints = processes, checkpoints
        self.progress, self.print_every = progress, print_every
        self.data = {split: to_device(tensors, device) for split, tensors in data.items()}
        model.to(device)
        self.batch_loss = wrap(BatchLoss(model, fused=config.fused,
                                         autocast_dtype=resolve_precision(config, device)), config, processes)
        optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
        steps_per_epoch = math.ceil(len(self.data["train"]["source"]) / config.batch_size)
        if config.limit_batches:
            steps_per_epoch = min(steps_per_epoch, config.limit_batches)
        self.steps_per_epoch = steps_per_epoch
        self.state = TrainingState(config=config, model=model, optimizer=optimizer,
                                   scaler=make_grad_scaler(config, device),
                                   scheduler=make_scheduler(config, optimizer, steps_per_epoch))
        self.best_weights = None  # the best epoch's weights, in memory when there are no checkpoints

    def fit(self, after_epoch=None):
        """Train the epochs left, each followed by its checkpoints and `after_epoch()` (the log).

        Stops early once `max_steps` steps are taken. CUDA running out of memory is raised as
        TrainingStopped, saying what to change.
        """
        with out_of_memory_stops(self.state.config):
            for epoch in range(self.state.epoch + 1, self.state.config.epochs + 1):
                config = self.state.config
                if config.max_steps is not None and self.state.steps >= config.max_steps:
                    break
                self.one_epoch(epoch, after_epoch)

    def one_epoch(self, epoch, after_epoch):
        state, config, processes = self.state, self.state.config, self.processes
        if processes.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(processes.device)
        batches = batch_indices(len(self.data["train"]["source"]), config.batch_size, processes,
                                epoch=epoch, seed=config.seed, limit=config.limit_batches)
        lr = state.optimizer.param_groups[0]["lr"]
        trained = train_epoch(self.batch_loss, state, self.data["train"], batches, processes=processes,
                              progress=self.progress, print_every=self.print_every,
                              description=f"epoch {epoch}/{config.epochs} train")
        validated = evaluate(self.batch_loss, self.data["validation"], processes=processes,
                             batch_size=config.batch_size, limit=config.limit_batches,
                             progress=self.progress, description=f"epoch {epoch}/{config.epochs} valid")
        # Before the epoch is logged or saved: weights that give no finite loss are not a best model.
        check_finite(validated["nll"], state.steps, "validation")
        previous = state.epochs[-1]["cumulative_seconds"] if state.epochs else 0.0
        cumulative = previous + trained["seconds"] + validated["seconds"]
        previous_best = state.best
        state.epochs.append(epoch_entry(epoch, trained, validated, cumulative=cumulative, lr=lr,
                                        processes=processes))
        improved = state.best is None or validated["loss"] < state.best["valid_loss"]
        if improved:
            state.best = {"epoch": epoch, "valid_loss": validated["loss"], "valid_ppl": validated["ppl"]}
        if self.checkpoints is None:
            if improved:
                self.best_weights = {key: value.detach().clone() for key, value in state.model.state_dict().items()}
        elif processes.main:
            try:
                if improved:  # complete, so that the run can continue from it too
                    state.save(self.checkpoints["best"])
                state.save(self.checkpoints["last"])
            except BaseException:  # the log must not claim an epoch that last.pt does not hold
                state.epochs.pop()
                state.best = previous_best
                raise
        if after_epoch is not None:
            after_epoch()
        processes.say(f"epoch {epoch}/{config.epochs}: train ppl {trained['ppl']:.2f}, valid ppl "
                      f"{validated['ppl']:.2f}, {trained['seconds']:.1f} s train "
                      f"({trained['tokens_per_second'] or 0:,.0f} tokens/s), {validated['seconds']:.1f} s valid"
                      + (" *best*" if improved else ""))

    def test(self):
        """The test split under the best epoch's weights: the log's "test" entry (None before any epoch)."""
        state, config = self.state, self.state.config
        if state.best is None:
            return None
        if self.checkpoints is not None:
            if self.processes.distributed:
                dist.barrier()  # rank 0 has finished writing best.pt
            state.model.load_state_dict(read_checkpoint(self.checkpoints["best"])["model"])
        elif self.best_weights is not None:
            state.model.load_state_dict(self.best_weights)
        with out_of_memory_stops(config):
            tested = evaluate(self.batch_loss, self.data["test"], processes=self.processes,
                              batch_size=config.batch_size, limit=config.limit_batches,
                              progress=self.progress, description="test")
        check_finite(tested["nll"], state.steps, "test")
        self.processes.say(f"test ppl {tested['ppl']:.2f} (model of epoch {state.best['epoch']}, "
                           f"best valid ppl {state.best['valid_ppl']:.2f})")
        return {"epoch": state.best["epoch"], "loss": tested["loss"], "ppl": tested["ppl"]}
