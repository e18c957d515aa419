"""Train one (or several) of the course's 12 language-model experiments on Wikitext-2.

    python run_exp.py --exp_id 6                 # preset 6: MiniGPT1, 1 layer, AdamW
    python run_exp.py --exp_id all               # the 12 in turn, skipping finished ones
    python run_exp.py --exp_id 6 --resume        # continue after an interruption
    python run_exp.py --exp_id mine --model gpt1 --layers 2 --optimizer sgd --lr 0.1
    torchrun --nproc_per_node 4 run_exp.py --exp_id 12

Each run writes LOG_DIR/EXP_ID/log.json (utils/data_utils.py) after every epoch, and the
checkpoints last.pt and best.pt (utils/checkpoint.py). Perplexities are exact:
exp(summed NLL over every real target token of a split / number of those tokens).
"""
import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from utils.checkpoint import (CheckpointError, build_model, read_checkpoint, restore_rng_state,
                              save_checkpoint, unwrap)
from utils.config import (DEFAULT_EMBEDDINGS, MODELS, OPTIMIZERS, PRECISIONS, SCHEDULERS,
                          ExperimentConfig, expand_exp_ids, resolve_config)
from utils.data_utils import LOG_NAME, LogError, read_log, write_log
from utils.embeddings import load_embedding_arrays
from utils.fast_path import BatchLoss
from utils.prepare_data import DataUnavailableError, ensure_data
from utils.torch_utils import seed_experiment, to_device
from utils.wikitext2 import Wikitext2


class UsageError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


class TrainingStopped(Exception):
    """The run could not go on (non-finite loss, out of memory): printed as one line, exit code 1."""


# ----------------------------------------------------------------------------------------------
# Set-up: processes, data, model, optimizer


class Processes:
    """This process's place among the torchrun processes (one process: rank 0 of 1)."""

    def __init__(self, device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            if device == "cpu" and self.rank == 0:
                print("warning: no CUDA device found: training on the CPU, which is slow "
                      "(--device cpu silences this warning)", file=sys.stderr)
        if device == "cuda" and self.world_size > 1:
            device = f"cuda:{self.local_rank}"
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device {device} asked for CUDA but none is available: use --device cpu")
            if self.device.index is None:  # "cuda": the current device, by its index (set_device needs one)
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
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


def fetch_missing_data(config, progress):
    """Prepare the splits, and GPT-1's embeddings where the default file is asked for, if missing.

    An embeddings file named on the command line is never fetched: a wrong path is an error.
    """
    ensure_data(config.data_folder, need_embeddings=config.embeddings == DEFAULT_EMBEDDINGS,
                embeddings_path=config.embeddings_path, progress=progress)


def load_splits(config, vocabulary_size):
    """The three splits as `{"source", "target", "mask"}` tensors `(N, sequence_length)`."""
    return {split: Wikitext2(config.data_folder, split, max_length=config.sequence_length,
                             vocabulary_size=vocabulary_size).tensors()
            for split in ("train", "validation", "test")}


def make_model(config):
    """The model of `config`, on pretrained embeddings unless `--embeddings none`."""
    if config.learn_embeddings:
        from utils.wikitext2 import GPT1_VOCABULARY_SIZE

        return build_model(config, GPT1_VOCABULARY_SIZE)
    arrays = load_embedding_arrays(config.embeddings_path,
                                   keys=("tokens",) if config.model == "lstm" else ("tokens", "position"))
    tokens = arrays["tokens"]
    position = arrays.get("position")
    if position is not None and position.shape[0] < config.sequence_length:
        raise UsageError(f"embeddings file {config.embeddings_path} has {position.shape[0]} positions, "
                         f"fewer than sequence_length={config.sequence_length}")
    if position is not None:
        position = position[:config.sequence_length]
    if config.model == "gpt1" and tokens.shape[1] % config.num_heads:
        raise UsageError(f"--num_heads={config.num_heads} does not divide the embeddings' width "
                         f"{tokens.shape[1]}")
    return build_model(config, tokens.shape[0], tokens.shape[1], config.sequence_length,
                       tokens_weight=tokens, position_weight=position)


def make_optimizer(config, parameters):
    """The optimizer named by `config.optimizer` (see the table in README.md).

    On the fast path it is PyTorch's fused kernel, on the CPU too: one kernel for all the
    parameters instead of some ten operations per parameter (AdamW's step for MiniGPT1 with one
    layer took 4.7 ms fused against 28 ms on the CPU here). Where a device has no fused kernel,
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


def make_scheduler(config, optimizer, steps_per_epoch):
    if config.scheduler == "cosine":
        total = config.max_steps or config.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    return None


def count_parameters(model):
    parameters = list(model.parameters())  # tied weights are one Parameter, counted once
    return {"total": sum(p.numel() for p in parameters),
            "learnable": sum(p.numel() for p in parameters if p.requires_grad)}


def environment(processes, config):
    device = processes.device
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "platform": platform.platform(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "world_size": processes.world_size,
        "autocast": "bf16" if resolve_precision(config, device) else "fp32",
        "fused": config.fused, "compile": config.compile,
    }
    return info


def resolve_precision(config, device):
    """The autocast dtype: bf16 on CUDA by default ("auto"), none (fp32) otherwise."""
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# ----------------------------------------------------------------------------------------------
# Measurements


def gpu_memory_mb(device):
    """Memory in use on the GPU as nvidia-smi shows it (NVML), else what PyTorch has reserved."""
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.device_memory_used(device) / 2 ** 20
    except Exception:  # no NVML bindings: the caching allocator's view, without the CUDA context
        return torch.cuda.memory_reserved(device) / 2 ** 20


def cpu_rss_mb():
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def perplexity(loss):
    return math.exp(loss) if loss < 700 else math.inf


# ----------------------------------------------------------------------------------------------
# The loop: one epoch of training, one pass of evaluation


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


def train(step, optimizer, data, batches, processes, scheduler=None, clip_grad_norm=None,
          max_steps=None, steps_done=0, progress=False, print_every=0, description="train",
          scaler=None):
    """One epoch of training over `batches` (from `batch_indices`). Returns its figures.

    `step` is a `BatchLoss` (possibly wrapped by DDP or torch.compile); `scaler` a GradScaler
    (`make_grad_scaler`; none: no scaling). The loss and perplexity are exact averages over the
    real tokens trained on, as trained.
    """
    step.train()
    device = processes.device
    present = data["mask"].sum(dim=1).cpu() > 0  # (N,) sequences that have a target
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    memory, started, steps = [], time.perf_counter(), steps_done
    bar = tqdm(batches, desc=description, disable=not (progress and processes.main),
               dynamic_ncols=True, leave=False)
    learnable = [p for p in unwrap(step).parameters() if p.requires_grad]
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    on_device = shares_on_device(batches, device)
    for index, (_, global_batch) in enumerate(bar):
        if max_steps is not None and steps >= max_steps:
            break
        batch = {key: value.index_select(0, on_device[index]) for key, value in data.items()}
        sequences = int(present[global_batch].sum())  # the same count on every process
        scale = processes.world_size / max(sequences, 1)
        optimizer.zero_grad(set_to_none=True)
        loss, batch_nll, batch_tokens = step(batch["source"], batch["target"], batch["mask"], scale)
        optimizer_step(loss, optimizer, scaler, learnable, clip_grad_norm)
        if scheduler is not None:
            scheduler.step()
        steps += 1
        nll_sum += batch_nll
        tokens += batch_tokens
        if index % 20 == 0 and device.type == "cuda":
            memory.append(gpu_memory_mb(device))
        if (index + 1) % (print_every or 50) == 0 or index == len(batches) - 1:
            # Syncs with the device, so only every print_every steps.
            running_nll, running_tokens = processes.sum(nll_sum, tokens)
            if not math.isfinite(running_nll):
                raise TrainingStopped(f"the training loss became {running_nll} at step {steps}: "
                                      "lower --lr (or add --clip_grad_norm 1.0)")
            rate = running_tokens / (time.perf_counter() - started)
            running_loss = running_nll / max(running_tokens, 1)
            if bar.disable and processes.main and print_every:
                print(f"  {description} step {index + 1}/{len(batches)}  loss {running_loss:.4f}  "
                      f"{rate:,.0f} tokens/s", flush=True)
            bar.set_postfix(loss=f"{running_loss:.3f}", tok_s=f"{rate:,.0f}")
    bar.close()
    total_nll, total_tokens = processes.sum(nll_sum, tokens)
    if not math.isfinite(total_nll):
        raise TrainingStopped(f"the training loss became {total_nll} at step {steps}: "
                              "lower --lr (or add --clip_grad_norm 1.0)")
    seconds = time.perf_counter() - started
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "ppl": perplexity(loss), "tokens": int(total_tokens), "seconds": seconds,
            "tokens_per_second": total_tokens / seconds if seconds > 0 else None,
            "steps": steps, "memory_samples": memory}


@torch.no_grad()
def evaluate(step, data, batch_size, processes, limit=None, progress=False, description="eval"):
    """A full deterministic pass over `data` in eval mode: exact loss and perplexity per token."""
    step.eval()
    device = processes.device
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    started = time.perf_counter()
    batches = batch_indices(len(data["source"]), batch_size, processes, limit=limit)
    module = unwrap(step)  # no gradients to synchronise: skip the DDP wrapper
    for share in tqdm(shares_on_device(batches, device), desc=description,
                      disable=not (progress and processes.main), dynamic_ncols=True, leave=False):
        if len(share) == 0:
            continue
        batch = {key: value.index_select(0, share) for key, value in data.items()}
        _, batch_nll, batch_tokens = module(batch["source"], batch["target"], batch["mask"], 1.0)
        nll_sum += batch_nll
        tokens += batch_tokens
    total_nll, total_tokens = processes.sum(nll_sum, tokens)
    seconds = time.perf_counter() - started
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "ppl": perplexity(loss), "tokens": int(total_tokens), "seconds": seconds,
            "tokens_per_second": total_tokens / seconds if seconds > 0 else None}


# ----------------------------------------------------------------------------------------------
# A whole run: resume or start, epochs, checkpoints, logs, test


class RunOptions:
    """How to run (not what): where logs go, resuming, device, progress. None means the default."""

    def __init__(self, log_dir="logs", write_logs=True, resume=False, overwrite=False, device=None,
                 progress_bar=None, print_every=10, num_workers=0):
        self.log_dir = log_dir
        self.write_logs = write_logs
        self.resume = resume
        self.overwrite = overwrite
        self.device = device
        self.progress_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        self.print_every = print_every
        self.num_workers = num_workers  # accepted for the course's CLI: the data is preloaded


RUN_FILES = (LOG_NAME, "last.pt", "best.pt")
# Fields that may change when a run is resumed: asking for more epochs or steps continues it.
RESUMABLE_CHANGES = {"epochs", "max_steps"}


def existing_run(run_dir):
    """`(log or None, has_checkpoint)` of what a run folder already holds."""
    log = None
    if os.path.isfile(os.path.join(run_dir, LOG_NAME)):
        log = read_log(os.path.join(run_dir, LOG_NAME))
    return log, os.path.isfile(os.path.join(run_dir, "last.pt"))


def checkpoint_to_resume(config, options, run_dir):
    """The payload of last.pt to continue from, or None to start afresh (after the checks)."""
    if not options.write_logs:
        return None
    log, has_checkpoint = existing_run(run_dir)
    if log is None and not has_checkpoint:
        return None
    if options.overwrite:
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):  # another process may have removed it
                os.remove(os.path.join(run_dir, name))
        return None
    if not options.resume:
        done = f"{len(log['epochs'])} epoch(s) logged, status {log['status']}" if log else "a checkpoint"
        raise UsageError(f"{run_dir} already holds a run ({done}): add --resume to continue it, "
                         "--overwrite to start again, or choose another --exp_id / --log_dir")
    if not has_checkpoint:
        raise UsageError(f"{run_dir} holds a log but no last.pt to resume from: "
                         "use --overwrite to start again")
    payload = read_checkpoint(os.path.join(run_dir, "last.pt"))
    stored = payload["config"]
    derived = set() if config.learn_embeddings else {"embedding_size"}  # read from the file
    changed = sorted(key for key, value in config.to_dict().items() if key in stored
                     and stored[key] != value and key not in RESUMABLE_CHANGES | derived)
    if changed:
        details = ", ".join(f"{key}: {stored[key]!r} -> {getattr(config, key)!r}" for key in changed)
        raise UsageError(f"--resume with a different configuration ({details}): "
                         "use the run's own flags, or --overwrite to start again")
    return payload


def epoch_entry(epoch, trained, validated, cumulative, lr, memory, processes):
    device = processes.device
    gpu = None
    if device.type == "cuda":
        samples = [m for m in memory if m is not None]
        gpu = {"steady": float(np.mean(samples)) if samples else None,
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


def run_experiment(config, options=None):
    """Train `config` to the end (or resume it), writing logs and checkpoints; returns the log."""
    options = options or RunOptions()
    processes = Processes(options.device)
    device = processes.device
    run_dir = os.path.join(options.log_dir, config.exp_id)
    say = print if processes.main else (lambda *args, **kwargs: None)

    payload = checkpoint_to_resume(config, options, run_dir)
    if payload is not None:
        config = ExperimentConfig.from_dict(dict(payload["config"], epochs=config.epochs,
                                                 max_steps=config.max_steps))
    seed_experiment(config.seed)
    try:
        fetch_missing_data(config, options.progress_bar and processes.main)
        model = make_model(config)
        data = load_splits(config, model.vocabulary_size)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    # Pretrained embeddings fix the width; the log and checkpoints record the model as built.
    config = config.replace(embedding_size=model.embedding_size)
    data = {split: to_device(tensors, device) for split, tensors in data.items()}
    model.to(device)
    parameters = count_parameters(model)
    say(f"exp {config.exp_id}: {config.model} x{config.layers} {config.optimizer} on {device} - "
        f"{parameters['total']:,} parameters, {parameters['learnable']:,} learnable")

    if device.type == "cuda" and config.fused:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    step = BatchLoss(model, fused=config.fused, autocast_dtype=resolve_precision(config, device))
    if config.compile:
        step = torch.compile(step)
    if processes.distributed:
        step = torch.nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None)
    learnable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, learnable)
    scaler = make_grad_scaler(config, device)
    steps_per_epoch = math.ceil(len(data["train"]["source"]) / config.batch_size)
    if config.limit_batches:
        steps_per_epoch = min(steps_per_epoch, config.limit_batches)
    scheduler = make_scheduler(config, optimizer, steps_per_epoch)

    log = {"exp_id": config.exp_id, "status": "running", "message": None, "config": config.to_dict(),
           "environment": environment(processes, config), "parameters": parameters,
           "epochs": [], "best": None, "test": None}
    steps, best_state = 0, None
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload.get("scheduler"):
            scheduler.load_state_dict(payload["scheduler"])
        if scaler.is_enabled() and payload.get("grad_scaler"):  # absent: saved without scaling
            scaler.load_state_dict(payload["grad_scaler"])
        restore_rng_state(payload["rng"])
        steps = payload["steps"]
        log["epochs"] = list(payload["state"].get("epochs", []))
        log["best"] = payload["state"].get("best")
        say(f"resuming {run_dir} after epoch {payload['epoch']} ({steps} steps)")
    paths = {"log": os.path.join(run_dir, LOG_NAME), "last": os.path.join(run_dir, "last.pt"),
             "best": os.path.join(run_dir, "best.pt")}

    def write(status=None, message=None):
        if status:
            log["status"], log["message"] = status, message
        if options.write_logs and processes.main:
            write_log(paths["log"], log)

    progress = options.progress_bar
    write()
    try:
        for epoch in range(len(log["epochs"]) + 1, config.epochs + 1):
            if config.max_steps is not None and steps >= config.max_steps:
                break
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            batches = batch_indices(len(data["train"]["source"]), config.batch_size, processes,
                                    epoch=epoch, seed=config.seed, limit=config.limit_batches)
            lr = optimizer.param_groups[0]["lr"]
            trained = train(step, optimizer, data["train"], batches, processes, scheduler,
                            config.clip_grad_norm, config.max_steps, steps, progress,
                            options.print_every, f"epoch {epoch}/{config.epochs} train", scaler)
            steps = trained["steps"]
            validated = evaluate(step, data["validation"], config.batch_size, processes,
                                 config.limit_batches, progress, f"epoch {epoch}/{config.epochs} valid")
            previous = log["epochs"][-1]["cumulative_seconds"] if log["epochs"] else 0.0
            cumulative = previous + trained["seconds"] + validated["seconds"]
            entry = epoch_entry(epoch, trained, validated, cumulative, lr, trained["memory_samples"], processes)
            log["epochs"].append(entry)
            improved = log["best"] is None or validated["loss"] < log["best"]["valid_loss"]
            if improved:
                log["best"] = {"epoch": epoch, "valid_loss": validated["loss"], "valid_ppl": validated["ppl"]}
            state = {"epochs": log["epochs"], "best": log["best"]}
            if options.write_logs and processes.main:
                if improved:
                    save_checkpoint(paths["best"], config, model, epoch=epoch, steps=steps, state=state)
                save_checkpoint(paths["last"], config, model, optimizer, scheduler, epoch, steps, state,
                                grad_scaler=scaler)
            elif improved:
                best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
            write()
            say(f"epoch {epoch}/{config.epochs}: train ppl {trained['ppl']:.2f}, valid ppl "
                f"{validated['ppl']:.2f}, {trained['seconds']:.1f} s train "
                f"({trained['tokens_per_second'] or 0:,.0f} tokens/s), {validated['seconds']:.1f} s valid"
                + (" *best*" if improved else ""))
    except TrainingStopped as error:
        write("failed", str(error))
        raise
    except torch.cuda.OutOfMemoryError:
        message = (f"CUDA out of memory at --batch_size {config.batch_size}: lower --batch_size "
                   "(or keep --precision auto/bf16 and the fused path on)")
        write("failed", message)
        raise TrainingStopped(message) from None

    if log["best"] is not None:
        if options.write_logs:
            if processes.distributed:
                dist.barrier()  # rank 0 has finished writing best.pt
            model.load_state_dict(read_checkpoint(paths["best"])["model"])
        elif best_state is not None:
            model.load_state_dict(best_state)
        tested = evaluate(step, data["test"], config.batch_size, processes, config.limit_batches,
                          progress, "test")
        log["test"] = {"epoch": log["best"]["epoch"], "loss": tested["loss"], "ppl": tested["ppl"]}
        say(f"test ppl {tested['ppl']:.2f} (model of epoch {log['best']['epoch']}, "
            f"best valid ppl {log['best']['valid_ppl']:.2f})")
    write("finished")
    return log


# ----------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2, as every error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
    return value


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--exp_id", default="custom",
        help="1..12 for the course's presets, 'all' or a list like 1,2,5, or a name for a custom run")
    add("--print_config", action="store_true", help="print the resolved configuration as JSON and exit")
    # The course's flags; set, they override the preset.
    add("--data_folder", default=None, help="folder with wiki.{train,validation,test}.npz (default data)")
    add("--batch_size", type=int, default=None, help="global batch size (default 16)")
    add("--model", choices=MODELS, default=None, help="architecture (default lstm)")
    add("--embeddings", default=None,
        help="pretrained embeddings .npz (default DATA_FOLDER/embeddings.npz), or 'none' to learn them")
    add("--layers", type=int, default=None, help="number of LSTM layers or transformer blocks (default 1)")
    add("--epochs", type=int, default=None, help="number of epochs (default 10)")
    add("--optimizer", choices=OPTIMIZERS, default=None, help="optimizer (default adam)")
    add("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    add("--momentum", type=float, default=None, help="momentum of the 'momentum' optimizer (default 0.9)")
    add("--weight_decay", type=float, default=None, help="weight decay of adamw/sgd/momentum (default 5e-4)")
    add("--seed", type=int, default=None, help="random seed (default 42)")
    add("--log", action="store_true", help="accepted for the course's CLI: logs are always written")
    add("--no_log", action="store_true", help="write no log and no checkpoint")
    add("--log_dir", default="logs", help="runs go to LOG_DIR/EXP_ID/")
    add("--num_workers", type=int, default=0, help="accepted for the course's CLI: the data is preloaded")
    add("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    add("--progress_bar", action="store_true", default=None, help="show progress bars (default: in a terminal)")
    add("--no_progress_bar", dest="progress_bar", action="store_false", help="hide progress bars")
    add("--print_every", type=int, default=10, help="without progress bars, print every N steps (0: never)")
    # Sizes (with --embeddings none), quick runs, and the options that are off unless asked for.
    add("--embedding_size", type=int, default=None, help="embedding width (default 768)")
    add("--hidden_size", type=int, default=None, help="LSTM hidden size (default 512)")
    add("--num_heads", type=int, default=None, help="attention heads (default 12)")
    add("--sequence_length", type=int, default=None, help="tokens per example (default 256)")
    add("--limit_batches", type=int, default=None, help="at most K batches per split and epoch")
    add("--max_steps", type=int, default=None, help="stop training after S optimizer steps in all")
    add("--scheduler", choices=SCHEDULERS, default=None, help="learning-rate schedule (default none)")
    add("--clip_grad_norm", type=float, default=None, help="clip the gradient norm to this value")
    add("--precision", choices=PRECISIONS, default=None,
        help="auto: bf16 autocast on CUDA (with loss scaling), fp32 on the CPU; fp32 turns mixed "
             "precision off")
    add("--no_fused", dest="fused", action="store_false", default=None,
        help="the course's plain path: explicit attention and dense log-probabilities")
    add("--compile", action="store_true", default=None, help="torch.compile the model and loss")
    add("--resume", action="store_true", help="continue the run in LOG_DIR/EXP_ID from last.pt")
    add("--overwrite", action="store_true", help="delete what LOG_DIR/EXP_ID holds and start again")
    return parser.parse_args(argv)


OVERRIDES = ("data_folder", "batch_size", "model", "embeddings", "layers", "epochs", "optimizer",
             "lr", "momentum", "weight_decay", "seed", "embedding_size", "hidden_size", "num_heads",
             "sequence_length", "limit_batches", "max_steps", "scheduler", "clip_grad_norm",
             "precision", "fused", "compile")


def configs_from_args(args):
    overrides = {name: getattr(args, name) for name in OVERRIDES}
    if args.embedding_size is not None and args.embeddings != "none":
        raise UsageError(f"--embedding_size={args.embedding_size} applies only with --embeddings none: "
                         "pretrained embeddings fix the width; add --embeddings none or drop the flag")
    return [resolve_config(exp_id, **overrides) for exp_id in expand_exp_ids(args.exp_id)]


def main(argv=None):
    try:
        args = parse_args(argv)
        configs = configs_from_args(args)
        if args.print_config:
            resolved = [config.to_dict() for config in configs]
            print(json.dumps(resolved[0] if len(resolved) == 1 else resolved, indent=2))
            return 0
        several = len(configs) > 1
        for config in configs:
            options = RunOptions(args.log_dir, not args.no_log, args.resume, args.overwrite,
                                 args.device, args.progress_bar, args.print_every, args.num_workers)
            if several and options.write_logs:
                log, has_checkpoint = existing_run(os.path.join(args.log_dir, config.exp_id))
                if log is not None and log["status"] == "finished":
                    print(f"exp {config.exp_id}: finished already, skipped")
                    continue
                options.resume = options.resume or has_checkpoint
            run_experiment(config, options)
        return 0
    except (UsageError, ValueError, FileNotFoundError, CheckpointError, LogError,
            DataUnavailableError) as error:
        print(f"run_exp.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"run_exp.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run_exp.py: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
