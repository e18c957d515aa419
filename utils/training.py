"""The training loop: set-up, an epoch of training, evaluation, resume and a whole run.

    run_experiment(config, RunOptions(...)) -> the run's log (utils/data_utils.py)
        Processes        this process's rank among torchrun's, and its device
        Run              data, model, BatchLoss, TrainingState (optimizer, scaler, scheduler, counts)
        each epoch       train_epoch -> evaluate(validation) -> log entry, last.pt and best.pt
        at the end       evaluate(test) with the best epoch's weights

Perplexities are exact: exp(summed NLL over every real target token of a split / their number).
"""
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from utils.checkpoint import (CheckpointError, DamagedCheckpointError, read_checkpoint, restore_rng_state,
                              save_checkpoint, verify_checkpoint)
from utils.cli import UsageError, environment_record, resolve_device
from utils.config import DEFAULT_EMBEDDINGS, ExperimentConfig
from utils.data_utils import LOG_NAME, write_log
from utils.fast_path import BatchLoss
from utils.language_model import perplexity
from utils.models import count_parameters, model_for_config
from utils.prepare_data import ensure_data
from utils.run_folder import (FolderContents, RunLock, check_writable_folder, describe_os_error,
                              drop_replaced, move_aside, put_back, recover, remove_if_unused,
                              remove_stale_temporaries)
from utils.torch_utils import seed_experiment, to_device, unwrap
from utils.wikitext2 import SPLITS, Wikitext2


class TrainingStopped(Exception):
    """The run could not go on (non-finite loss, out of memory): printed as one line, exit code 1."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run ends as "stopped", and the process with 128 + the signal's number."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self):
        return 128 + self.signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def replace_stop_handlers(handler):
    """Install `handler` for SIGINT and SIGTERM; the handlers it replaced, to give back. A signal the
    process was started to ignore (SIGINT of `command &`) stays ignored, and so does one whose
    handler is not Python's (it could not be given back); off the main thread nothing changes."""
    previous = {}
    try:
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            if current is not signal.SIG_IGN and current is not None:
                previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return previous


def restore_handlers(previous):
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    previous.clear()


@contextlib.contextmanager
def signals_interrupt():
    """Within the block, SIGINT and SIGTERM raise `Interrupted`, so that a run can record its stop.

    Without it SIGTERM kills the process where it stands: the log says "running" for ever and a
    file being written leaves its temporary behind.
    """
    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = replace_stop_handlers(interrupt)
    try:
        yield
    finally:
        restore_handlers(previous)


class HeldSignals:
    """Holds SIGINT and SIGTERM during a step that must not be cut in two (the first log and the
    removal of the run it replaces). `release`, called inside the `try` that records a stop, gives
    the handlers back and raises the first signal held; if the block fails, they are given back as
    its error propagates. Holding until `release` (not the block's end) leaves no moment between the
    two in which a signal could escape unrecorded."""

    def __init__(self):
        self.signals, self.previous = [], {}

    def __enter__(self):
        self.previous = replace_stop_handlers(lambda signum, frame: self.signals.append(signum))
        return self

    def __exit__(self, error_type, *rest):
        if error_type is not None:
            restore_handlers(self.previous)

    def release(self):
        restore_handlers(self.previous)
        if self.signals:
            raise Interrupted(self.signals[0])


# ----------------------------------------------------------------------------------------------
# Processes, precision, optimizer


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


def make_optimizer(config, parameters):
    """The optimizer named by `config.optimizer` (see the table in README.md).

    On the fast path it is PyTorch's fused kernel, on the CPU too: one kernel for all the
    parameters instead of some ten operations per parameter. Where a device has no fused kernel,
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
    size this loss gives (about 1e-5) lose their precision or vanish without scaling. For bf16
    alone scaling is harmless (bf16 has fp32's range) and, with fused optimizers, costs no sync.
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
# Measurements


def gpu_memory_mb(device):
    """`(MiB, source)`: the GPU's memory in use as nvidia-smi shows it (source "nvml").

    Without the NVML bindings (`nvidia-ml-py`) it is what PyTorch's allocator has reserved
    (source "torch_reserved"), which leaves out the CUDA context and so reads lower.
    """
    try:
        return torch.cuda.device_memory_used(device) / 2 ** 20, "nvml"
    except Exception:  # ModuleNotFoundError (pynvml), or NVML cannot be initialised
        return torch.cuda.memory_reserved(device) / 2 ** 20, "torch_reserved"


def cpu_rss_mb():
    """This process's resident memory in MiB."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment(processes, config):
    """The log's record of where and how the run was computed."""
    device = processes.device
    precision, reason = choose_precision(config, device)
    return dict(environment_record(device), world_size=processes.world_size, autocast=precision,
                precision_reason=reason, fused=config.fused, compile=config.compile)


# ----------------------------------------------------------------------------------------------
# Batches, an epoch of training, an evaluation pass


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


def check_finite(nll, steps):
    if not math.isfinite(nll):
        raise TrainingStopped(f"the training loss became {nll} at step {steps}: "
                              "lower --lr (or add --clip_grad_norm 1.0)")


def split_figures(processes, nll_sum, tokens, started):
    """Exact loss and perplexity of a pass from its summed NLL and token count, over all processes."""
    total_nll, total_tokens = processes.sum(nll_sum, tokens)
    seconds = time.perf_counter() - started
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "ppl": perplexity(loss), "tokens": int(total_tokens), "seconds": seconds,
            "tokens_per_second": total_tokens / seconds if seconds > 0 else None, "nll": total_nll}


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
# A run folder: what it holds, and whether to resume


@dataclasses.dataclass
class RunOptions:
    """How to run (not what): where logs go, resuming, device, progress. None means the default."""

    log_dir: str = "logs"
    write_logs: bool = True
    resume: bool = False
    overwrite: bool = False
    device: Optional[str] = None
    progress_bar: Optional[bool] = None  # None: bars when stderr is a terminal
    print_every: int = 10
    num_workers: int = 0  # accepted for the course's CLI: the data is preloaded

    def __post_init__(self):
        if self.progress_bar is None:
            self.progress_bar = sys.stderr.isatty()


# Fields that may change when a run is resumed: asking for more epochs or steps continues it.
RESUMABLE_CHANGES = {"epochs", "max_steps"}


def usable_checkpoint(contents):
    """The payload to continue the folder's run from: last.pt, or best.pt when there is no last.pt.

    A damaged last.pt is refused in one line that names best.pt when that one verifies.
    """
    if contents.last is None and contents.best is None:
        return None
    path = contents.last or contents.best
    try:
        payload = read_checkpoint(path)
    except DamagedCheckpointError as error:
        raise CheckpointError(f"{error}; {alternative(contents, path)}") from None
    if payload.get("optimizer") is None:
        raise CheckpointError(f"{path} holds no optimizer state (a best.pt written before best "
                              "checkpoints were complete): it serves generation and the report, not "
                              f"--resume; {alternative(contents, path)}")
    if path == contents.best:
        print(f"note: {contents.run_dir} has no last.pt: continuing from best.pt (epoch "
              f"{payload['epoch']})", file=sys.stderr)
    return payload


def alternative(contents, refused):
    """What to do instead of `refused`: the run's other checkpoint if it verifies, else start again."""
    other = contents.best if refused == contents.last else contents.last
    if other is not None:
        try:
            verify_checkpoint(other)
            epoch = read_checkpoint(other).get("epoch")
            return (f"{other} verifies (epoch {epoch}): copy it over {refused} and add --resume to "
                    "continue from it, or --overwrite to start again")
        except (CheckpointError, OSError):
            pass
    return "use --overwrite to start again"


def plan_start(config, options, contents):
    """`(payload or None, replace_old)`: where the run starts, after the checks.

    `payload` is the checkpoint to continue from; `replace_old` says that what the folder holds is
    to be moved aside, and deleted once the new run has written its first log.
    """
    if contents is None or contents.empty:
        return None, False
    if options.overwrite:
        return None, True
    died = contents.log is not None and contents.log.get("status") == "running"  # we hold the lock
    if not options.resume:
        note = " whose process died" if died else ""
        raise UsageError(f"{contents.run_dir} already holds a run{note} ({contents.describe()}): add "
                         "--resume to continue it, --overwrite to start again, or choose another "
                         "--exp_id / --log_dir")
    if died:
        print(f"note: {contents.run_dir}: the log says running but no process holds the folder: "
              "the previous run died (killed?); continuing from its last checkpoint", file=sys.stderr)
    payload = usable_checkpoint(contents)
    if payload is None:
        if contents.epochs_logged == 0:  # stopped in its first epoch: nothing to continue from
            return None, True
        raise UsageError(f"{contents.run_dir} holds {contents.describe()} but no checkpoint to resume "
                         "from: use --overwrite to start again")
    check_same_config(config, payload["config"])
    return payload, False


def check_same_config(config, stored):
    """Refuse to resume with flags that change what the run computes (epochs and steps may grow)."""
    derived = set() if config.learn_embeddings else {"embedding_size"}  # read from the file
    changed = sorted(key for key, value in config.to_dict().items() if key in stored
                     and stored[key] != value and key not in RESUMABLE_CHANGES | derived)
    if changed:
        details = ", ".join(f"{key}: {stored[key]!r} -> {getattr(config, key)!r}" for key in changed)
        raise UsageError(f"--resume with a different configuration ({details}): "
                         "use the run's own flags, or --overwrite to start again")
    # A schedule is laid over the run's length: past its end a cosine would climb back up.
    lengths = [key for key in sorted(RESUMABLE_CHANGES) if key in stored and stored[key] != getattr(config, key)]
    if stored.get("scheduler", "none") != "none" and lengths:
        details = ", ".join(f"{key}: {stored[key]!r} -> {getattr(config, key)!r}" for key in lengths)
        raise UsageError(f"--scheduler {stored['scheduler']} fixes the run's length, so --resume cannot "
                         f"change it ({details}): use the run's own flags, or --overwrite")


def resumed_config(config, payload):
    """The stored config, with the epochs and steps asked for; never fewer epochs than it has run."""
    done = len(payload["state"].get("epochs", []))
    return ExperimentConfig.from_dict(dict(payload["config"], epochs=max(config.epochs, done),
                                           max_steps=config.max_steps))


# ----------------------------------------------------------------------------------------------
# A whole run


def fetch_inputs(config, progress):
    """Prepare the data folder's missing files; the default embeddings file is fetched when missing,
    a file named on the command line never is."""
    try:
        ensure_data(config.data_folder, need_embeddings=config.embeddings == DEFAULT_EMBEDDINGS,
                    embeddings_path=config.embeddings_path, progress=progress)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None


def check_precision(config, device):
    """Refuse, in one line, a precision the device cannot run for this model."""
    if config.model == "lstm" and device.type == "cpu" and choose_precision(config, device)[0] == "fp16":
        raise UsageError("--precision fp16 on the CPU runs MiniGPT1 only (oneDNN has no fp16 LSTM): "
                         "use --precision bf16 or fp32")


def load_model_and_data(config, options, processes):
    """The model of `config` and its three splits, fetching missing data first; bad input -> UsageError."""
    fetch_inputs(config, options.progress_bar and processes.main)
    try:
        model = model_for_config(config)
        data = {}
        for split in SPLITS:
            dataset = Wikitext2(config.data_folder, split, max_length=config.sequence_length,
                                vocabulary_size=model.vocabulary_size)
            if len(dataset) == 0:
                raise UsageError(f"the {split} split in {config.data_folder} holds no example: "
                                 "prepare the data again (python -m utils.prepare_data)")
            data[split] = dataset.tensors()  # {"source", "target", "mask"}, each (N, sequence_length)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    return model, data


class Run:
    """One run in progress: its processes, data, loss module, training state, log and files."""

    def __init__(self, config, options, processes, model, data):
        device = processes.device
        self.options, self.processes = options, processes
        self.say = print if processes.main else (lambda *args, **kwargs: None)
        self.data = {split: to_device(tensors, device) for split, tensors in data.items()}
        model.to(device)
        parameters = count_parameters(model)
        self.say(f"exp {config.exp_id}: {config.model} x{config.layers} {config.optimizer} on {device} - "
                 f"{parameters['total']:,} parameters, {parameters['learnable']:,} learnable")
        self.say("precision: {} ({})".format(*choose_precision(config, device)))
        self.batch_loss = self.wrap(BatchLoss(model, fused=config.fused,
                                              autocast_dtype=resolve_precision(config, device)), config)
        optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
        steps_per_epoch = math.ceil(len(self.data["train"]["source"]) / config.batch_size)
        if config.limit_batches:
            steps_per_epoch = min(steps_per_epoch, config.limit_batches)
        self.state = TrainingState(config=config, model=model, optimizer=optimizer,
                                   scaler=make_grad_scaler(config, device),
                                   scheduler=make_scheduler(config, optimizer, steps_per_epoch))
        self.log = {"exp_id": config.exp_id, "status": "running", "message": None,
                    "config": config.to_dict(), "environment": environment(processes, config),
                    "parameters": parameters, "epochs": [], "best": None, "test": None}
        run_dir = os.path.join(options.log_dir, config.exp_id)
        self.paths = {name: os.path.join(run_dir, file)
                      for name, file in (("log", LOG_NAME), ("last", "last.pt"), ("best", "best.pt"))}
        self.best_weights = None  # the best epoch's weights, kept in memory when no files are written

    def wrap(self, batch_loss, config):
        """TF32, torch.compile and DistributedDataParallel, as the config and processes ask."""
        device = self.processes.device
        if device.type == "cuda" and config.fused:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if config.compile:
            batch_loss = torch.compile(batch_loss)
        if self.processes.distributed:
            batch_loss = torch.nn.parallel.DistributedDataParallel(
                batch_loss, device_ids=[device.index] if device.type == "cuda" else None)
        return batch_loss

    @property
    def writes_files(self):
        return self.options.write_logs and self.processes.main

    def write_log(self, status=None, message=None):
        if status:
            self.log["status"], self.log["message"] = status, message
        self.log["epochs"], self.log["best"] = self.state.epochs, self.state.best
        if self.writes_files:
            write_log(self.paths["log"], self.log)

    def resume(self, payload, run_dir):
        self.state.restore(payload)
        self.say(f"resuming {run_dir} after epoch {payload['epoch']} ({self.state.steps} steps)")

    def fit(self):
        """Train the remaining epochs; a failure is logged as such before it is raised."""
        try:
            for epoch in range(self.state.epoch + 1, self.state.config.epochs + 1):
                config = self.state.config
                if config.max_steps is not None and self.state.steps >= config.max_steps:
                    break
                self.one_epoch(epoch)
        except TrainingStopped as error:
            self.end("failed", str(error))
            raise
        except torch.cuda.OutOfMemoryError:
            message = (f"CUDA out of memory at --batch_size {self.state.config.batch_size}: lower "
                       "--batch_size (or keep --precision auto and the fast path on)")
            self.end("failed", message)
            raise TrainingStopped(message) from None

    def end(self, status, message):
        """Record how the run ended; a log that cannot be written any more is left as it was."""
        try:
            self.write_log(status, message)
        except OSError:
            pass

    def file_failure(self, error):
        """An error writing the run's files during training: "failed", the last good epoch kept."""
        where = error.filename or os.path.dirname(self.paths["log"])
        message = (f"cannot write {where} ({describe_os_error(error)}): the files of epoch "
                   f"{self.state.epoch} are kept; free the disk and continue with --resume")
        self.end("failed", message)
        return TrainingStopped(message)

    def interrupted(self, interrupt):
        """SIGINT or SIGTERM: "stopped", with how to go on."""
        self.end("stopped", f"stopped by {interrupt} after {self.state.epoch} epoch(s): continue "
                            "with the same command and --resume")

    def one_epoch(self, epoch):
        state, config, processes = self.state, self.state.config, self.processes
        if processes.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(processes.device)
        batches = batch_indices(len(self.data["train"]["source"]), config.batch_size, processes,
                                epoch=epoch, seed=config.seed, limit=config.limit_batches)
        lr = state.optimizer.param_groups[0]["lr"]
        progress = self.options.progress_bar
        trained = train_epoch(self.batch_loss, state, self.data["train"], batches, processes=processes,
                              progress=progress, print_every=self.options.print_every,
                              description=f"epoch {epoch}/{config.epochs} train")
        validated = evaluate(self.batch_loss, self.data["validation"], processes=processes,
                             batch_size=config.batch_size, limit=config.limit_batches,
                             progress=progress, description=f"epoch {epoch}/{config.epochs} valid")
        previous = state.epochs[-1]["cumulative_seconds"] if state.epochs else 0.0
        cumulative = previous + trained["seconds"] + validated["seconds"]
        previous_best = state.best
        state.epochs.append(epoch_entry(epoch, trained, validated, cumulative=cumulative, lr=lr,
                                        processes=processes))
        improved = state.best is None or validated["loss"] < state.best["valid_loss"]
        if improved:
            state.best = {"epoch": epoch, "valid_loss": validated["loss"], "valid_ppl": validated["ppl"]}
        if self.writes_files:
            try:
                if improved:  # complete, so that the run can continue from it too
                    state.save(self.paths["best"])
                state.save(self.paths["last"])
            except BaseException:  # the log must not claim an epoch that last.pt does not hold
                state.epochs.pop()
                state.best = previous_best
                raise
        elif improved:
            self.best_weights = {key: value.detach().clone() for key, value in state.model.state_dict().items()}
        self.write_log()
        self.say(f"epoch {epoch}/{config.epochs}: train ppl {trained['ppl']:.2f}, valid ppl "
                 f"{validated['ppl']:.2f}, {trained['seconds']:.1f} s train "
                 f"({trained['tokens_per_second'] or 0:,.0f} tokens/s), {validated['seconds']:.1f} s valid"
                 + (" *best*" if improved else ""))

    def test(self):
        """The test split under the best epoch's weights, into the log."""
        state, config = self.state, self.state.config
        if state.best is None:
            return
        if self.options.write_logs:
            if self.processes.distributed:
                dist.barrier()  # rank 0 has finished writing best.pt
            state.model.load_state_dict(read_checkpoint(self.paths["best"])["model"])
        elif self.best_weights is not None:
            state.model.load_state_dict(self.best_weights)
        tested = evaluate(self.batch_loss, self.data["test"], processes=self.processes,
                          batch_size=config.batch_size, limit=config.limit_batches,
                          progress=self.options.progress_bar, description="test")
        self.log["test"] = {"epoch": state.best["epoch"], "loss": tested["loss"], "ppl": tested["ppl"]}
        self.say(f"test ppl {tested['ppl']:.2f} (model of epoch {state.best['epoch']}, "
                 f"best valid ppl {state.best['valid_ppl']:.2f})")


def run_experiment(config, options=None):
    """Train `config` to the end (or resume it), writing logs and checkpoints; returns the log.

    The run folder is checked and locked before anything is read or written; an old run that
    `--overwrite` replaces is deleted only once the new run has written its first log.
    """
    options = options or RunOptions()
    processes = Processes(options.device)
    check_precision(config, processes.device)
    run_dir = os.path.join(options.log_dir, config.exp_id)
    if not (options.write_logs and processes.main):
        # Other torchrun ranks read the folder unlocked. They read before DDP's constructor, a
        # collective that rank 0 passes only then and before it writes its first log, so they never
        # see the new run half-written (rank 0's `recover` of an old overwrite is not ordered).
        return start_run(config, options, processes, run_dir)
    check_writable_folder(options.log_dir)
    new_folder = not os.path.isdir(run_dir)
    check_writable_folder(run_dir)
    with RunLock(run_dir) as lock:
        try:
            recover(run_dir)
            remove_stale_temporaries(run_dir)
            return start_run(config, options, processes, run_dir)
        finally:
            if new_folder or lock.made_folder:  # still the owner: no other process can use the folder
                remove_if_unused(run_dir)


def start_run(config, options, processes, run_dir):
    """Everything after the folder is ours: the checks, the set-up, the epochs and the test."""
    contents = FolderContents(run_dir) if options.write_logs else None
    payload, replace_old = plan_start(config, options, contents)
    if payload is not None:
        config = resumed_config(config, payload)
    seed_experiment(config.seed)
    model, data = load_model_and_data(config, options, processes)
    # Pretrained embeddings fix the width; the log and checkpoints record the model as built.
    run = Run(config.replace(embedding_size=model.embedding_size), options, processes, model, data)
    if payload is not None:
        run.resume(payload, run_dir)
    # A signal between the first log and the `try` below would leave that log saying "running"; one
    # within write_first_log could put an old run back beside the new log. They wait until here.
    with HeldSignals() as held:
        write_first_log(run, run_dir, replace_old and run.writes_files)
    try:
        held.release()
        run.fit()
        run.test()
        run.write_log("finished")
    except KeyboardInterrupt as interrupt:
        run.interrupted(interrupt if isinstance(interrupt, Interrupted) else Interrupted())
        raise
    except OSError as error:
        raise run.file_failure(error) from None
    except TrainingStopped:
        raise
    except Exception as error:  # whatever else ends the run, the log says so rather than "running"
        run.end("failed", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        raise
    return run.log


def write_first_log(run, run_dir, replace_old):
    """The run's first log; with `replace_old`, the old run is set aside first and dropped after."""
    if replace_old:
        move_aside(run_dir)
    try:
        run.write_log()
    except OSError as error:
        if replace_old:
            put_back(run_dir)
        raise UsageError(f"cannot write {run.paths['log']} ({describe_os_error(error)}): "
                         "free the disk or choose another --log_dir") from None
    except BaseException:
        if replace_old:
            put_back(run_dir)
        raise
    if replace_old:
        drop_replaced(run_dir)
