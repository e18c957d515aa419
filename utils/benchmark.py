"""Speed and memory of the reference path and the fused path: `python -m utils.benchmark`.

    python -m utils.benchmark                          # the six models, on CUDA when present
    python -m utils.benchmark --device cpu --quick     # a short CPU run
    python -m utils.benchmark --models gpt1,gpt4 --json bench.json
    python -m utils.benchmark --gpu-check --json gpu_check.json   # benchmark + epochs of configs 2 and 6

Both paths of each model (LSTM and MiniGPT1 with 1, 2 and 4 layers, the presets' sizes) are
measured in one process on the same weights and batch: tokens/s of training and evaluation in
windows taken in turn, steady and peak memory, ATen operations per step, and model FLOPs counted
analytically as a fraction of the device's measured matmul rate. The method, and every
measurement so far, are in docs/PERFORMANCE.md.
"""
import argparse
import collections
import contextlib
import copy
import ctypes
import datetime
import functools
import gc
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from utils.cli import (OneLineParser, UsageError, environment_record, fail, positive_int,
                       resolve_device, shared_data_path)
from utils.config import resolve_config
from utils.data_folder import EMBEDDINGS_FILE, SPLITS, split_path
from utils.batch_loss import BatchLoss
from utils.files import write_json
from utils.models import build_model
from utils.experiment import RunOptions, run_experiment
from utils.training import (check_precision, choose_precision, make_grad_scaler, make_optimizer,
                            optimizer_step, resolve_precision)
from utils.wikitext2 import GPT1_VOCABULARY_SIZE

PROG = "python -m utils.benchmark"
# The benchmark's models and the presets they come from (all trained with AdamW).
MODELS = {"lstm1": "2", "lstm2": "9", "lstm4": "10", "gpt1": "6", "gpt2": "11", "gpt4": "12"}
PATHS = ("reference", "fused")
QUICK_MODELS = ("lstm1", "gpt1")
class Settings:
    """How long and how big: the defaults per device, and what `--quick` reduces.

    `--quick` runs LSTM 1 and MiniGPT1 1 at batch 1 with 3 windows of 1 step; flags given win.
    `reduced` says, in words, what differs from the full run's defaults.
    """

    def __init__(self, device, models=None, batch_size=None, sequence_length=None, windows=None,
                 steps_per_window=None, warmup=None, quick=False):
        cuda = device.type == "cuda"
        full = {"models": list(MODELS), "batch_size": 16, "windows": 5 if cuda else 3,
                "steps_per_window": 10 if cuda else 1}
        short = {"models": list(QUICK_MODELS), "batch_size": 1, "windows": 3, "steps_per_window": 1}
        defaults = short if quick else full
        given = {"models": models, "batch_size": batch_size, "windows": windows,
                 "steps_per_window": steps_per_window}
        chosen = {key: defaults[key] if value is None else list(value) if key == "models" else value
                  for key, value in given.items()}
        self.quick = quick
        self.models = chosen["models"]
        self.batch_size = chosen["batch_size"]
        self.windows = chosen["windows"]
        self.steps_per_window = chosen["steps_per_window"]
        self.sequence_length = sequence_length or 256
        self.warmup = warmup or (3 if cuda else 1)
        self.reduced = []
        if quick:
            self.reduced = [f"{key.replace('_', ' ')} {','.join(value) if key == 'models' else value}"
                            f" (full run: {','.join(full[key]) if key == 'models' else full[key]})"
                            for key, value in chosen.items() if given[key] is None and value != full[key]]

    def to_dict(self):
        return {"models": self.models, "batch_size": self.batch_size,
                "sequence_length": self.sequence_length, "vocabulary_size": GPT1_VOCABULARY_SIZE,
                "windows": self.windows, "steps_per_window": self.steps_per_window,
                "warmup_steps": self.warmup, "quick": self.quick, "reduced": self.reduced}


def say(message):
    """Progress on stderr, so that stdout holds the table alone."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Model FLOPs


def model_flops_per_token(config, vocabulary_size=GPT1_VOCABULARY_SIZE):
    """Matmul FLOPs per token `{"forward", "backward", "train"}` of a preset-like `config`.

    Forward: the sum of 2mkn over the matmuls per token. Backward: the same product again for the
    gradient of each matmul input that needs one (not the first layer's input when the
    embeddings are frozen) and for each learnable weight (not the tied output weight when frozen).

        MiniGPT1, C channels, L blocks, T positions, V vocabulary, frozen embeddings:
          forward  = L (24 C^2 + 2 C (T + 1)) + 2 C V
                     24 C^2: Q, K, V, output maps (4 x 2 C^2) and the MLP (2 x 2 C * 4C);
                     2 C (T + 1): Q K^T and A V, each 2 C (T + 1) / 2 over the causal half
          backward = L (48 C^2 + 4 C (T + 1)) - 6 C^2 + 2 C V
        LSTM, E embedding, H hidden, L layers (input width E, then H):
          forward  = sum over layers of 8 H (input width + H) + 2 H E + 2 E V
          backward = 2 x (the recurrent and H->E parts) + the input maps' weights, and their
                     inputs' gradient except the first layer's + 2 E V
    With learned embeddings the output weight's gradient adds 2 C V (2 E V) to the backward pass.
    """
    learn = config.learn_embeddings
    head = 2 * config.embedding_size * vocabulary_size  # (N, C) @ (C, V)
    if config.model == "gpt1":
        width, length = config.embedding_size, config.sequence_length
        dense = 24 * width * width
        attention = 2 * width * (length + 1)
        forward = config.layers * (dense + attention) + head
        first_inputs = 0 if learn else 3 * 2 * width * width  # Q, K, V of the first block
        backward = config.layers * 2 * (dense + attention) - first_inputs + head * (2 if learn else 1)
    else:
        embedding, hidden = config.embedding_size, config.hidden_size
        widths = [embedding] + [hidden] * (config.layers - 1)
        input_maps = sum(8 * hidden * width for width in widths)  # x_t @ W_ih, 4 gates
        recurrent = config.layers * 8 * hidden * hidden  # h_{t-1} @ W_hh
        projection = 2 * hidden * embedding  # Linear H -> E
        forward = input_maps + recurrent + projection + head
        input_grads = input_maps - (0 if learn else 8 * hidden * embedding)
        backward = input_maps + input_grads + 2 * (recurrent + projection) + head * (2 if learn else 1)
    return {"forward": forward, "backward": backward, "train": forward + backward}


def matmul_rate(device, size=None, repeats=None):
    """The device's matmul FLOP/s: bf16 `size^3` products on CUDA (8192), fp32 on the CPU (2048).

    The fastest of `repeats` products after two of warm-up: the rate the device can reach, which
    on a shared CPU the median would understate.
    """
    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 2048)
    repeats = repeats or (20 if cuda else 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    times = [timed(device, lambda: a @ b) for _ in range(repeats + 2)][2:]
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "flops_per_second": 2 * size ** 3 / min(times)}


# ----------------------------------------------------------------------------------------------
# Memory and time


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, function):
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations that run while it is active, views excluded.

    On a GPU nearly every such operation is one kernel launch, and eager PyTorch spends some
    microseconds of host time on each: a training step of many small operations is bound by the
    host, not by the card. The count is the same on every device, so the CPU shows it too.
    """

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(function):
    """`{"total", "by_op"}`: the ATen operations (not views) that one call of `function` runs."""
    with OpCounter() as counter:
        function()
    return {"total": sum(counter.counts.values()), "by_op": dict(counter.counts.most_common())}


def _proc_status_mb(field):
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return None


def _release_free_heap():
    """Hand glibc's free heap pages back to the system, so that RSS counts live memory alone."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then include freed memory
        pass


def _reset_rss_peak():
    """Reset the kernel's high-water mark of this process's RSS (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Steady and peak memory of one path, measured while nothing of the other path is alive."""

    def __init__(self, device):
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device) / 2 ** 20
        else:
            _release_free_heap()
            self.baseline = _proc_status_mb("VmRSS")
            self.peak_resettable = _reset_rss_peak()
        self.steady = {}

    def sample_steady(self):
        if self.device.type == "cuda":
            self.steady = {"steady_allocated_mb": torch.cuda.memory_allocated(self.device) / 2 ** 20,
                           "steady_mb": torch.cuda.memory_reserved(self.device) / 2 ** 20}
        else:
            _release_free_heap()
            rss = _proc_status_mb("VmRSS")
            self.steady = {"steady_mb": None if rss is None else rss - self.baseline}

    def result(self):
        if self.device.type == "cuda":
            return dict(self.steady, baseline_allocated_mb=self.baseline,
                        peak_allocated_mb=torch.cuda.max_memory_allocated(self.device) / 2 ** 20,
                        peak_mb=torch.cuda.max_memory_reserved(self.device) / 2 ** 20,
                        measure="CUDA caching allocator: reserved after warm-up training steps "
                                "(steady) and peak reserved (peak), MiB")
        peak = _proc_status_mb("VmHWM")
        return dict(self.steady, baseline_rss_mb=self.baseline,
                    peak_mb=None if peak is None or self.baseline is None else peak - self.baseline,
                    measure="process RSS above the RSS before the path's model was built, MiB"
                            + ("" if self.peak_resettable else "; peak over the process's life"))


# ----------------------------------------------------------------------------------------------
# One path of one model


def path_config(config, path):
    """The config a path trains with: the reference path in fp32, the fused path as the loop runs it."""
    if path == "reference":
        return config.replace(fused=False, precision="fp32")
    return config.replace(fused=True, precision="auto")


@contextlib.contextmanager
def tf32(enabled):
    """TF32 matmuls and convolutions on or off, as the training loop sets them for the path."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class PathRunner:
    """A copy of the model with the loss module and optimizer of one path, ready to step."""

    def __init__(self, base_model, config, path, device, batch):
        self.config = path_config(config, path)
        check_precision(self.config, device)  # the run's own refusal: CPU autocast only where the probe allows
        self.device = device
        self.batch = batch
        self.model = copy.deepcopy(base_model).to(device)
        self.batch_loss = BatchLoss(self.model, fused=self.config.fused,
                              autocast_dtype=resolve_precision(self.config, device))
        learnable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.config, learnable)
        self.scaler = make_grad_scaler(self.config, device)
        self.learnable = learnable
        # The training loop turns TF32 on for the fused path on CUDA and leaves PyTorch's defaults otherwise.
        self.tf32 = True if device.type == "cuda" and self.config.fused else None

    def train(self, steps):
        source, target, mask = self.batch
        scale = 1.0 / source.shape[0]
        self.batch_loss.train()
        with tf32(self.tf32):
            for _ in range(steps):
                self.optimizer.zero_grad(set_to_none=True)
                loss, _, _ = self.batch_loss(source, target, mask, scale)
                optimizer_step(loss, self.optimizer, self.scaler, self.learnable)

    @torch.no_grad()
    def evaluate(self, steps):
        source, target, mask = self.batch
        self.batch_loss.eval()
        with tf32(self.tf32):
            for _ in range(steps):
                self.batch_loss(source, target, mask, 1.0)


def random_batch(settings, device, seed=0):
    """`(source, target, mask)` of random ids `(B, T)`, every position real."""
    generator = torch.Generator().manual_seed(seed)
    shape = (settings.batch_size, settings.sequence_length)
    source = torch.randint(1, GPT1_VOCABULARY_SIZE, shape, generator=generator)
    target = torch.randint(1, GPT1_VOCABULARY_SIZE, shape, generator=generator)
    return source.to(device), target.to(device), torch.ones(shape, device=device)


def benchmark_model(name, settings, device, rate=None):
    """The measurements of one model: both paths' memory and speed, and the ratios."""
    config = resolve_config(MODELS[name], batch_size=settings.batch_size,
                            sequence_length=settings.sequence_length)
    torch.manual_seed(0)
    base = build_model(config, GPT1_VOCABULARY_SIZE)  # random embeddings, frozen as in the presets
    batch = random_batch(settings, device)
    tokens = settings.batch_size * settings.sequence_length
    flops = model_flops_per_token(config)
    result = {"model": name, "exp_id": config.exp_id, "kind": config.model, "layers": config.layers,
              "parameters": {"total": sum(p.numel() for p in base.parameters()),
                             "learnable": sum(p.numel() for p in base.parameters() if p.requires_grad)},
              "flops_per_token": flops, "paths": {}}

    # One step of each path on a tiny batch first: one-time costs (thread pools, library handles
    # and workspaces, the heap's first growth) would otherwise count as the first path's memory.
    tiny = tuple(tensor[:1, :8] for tensor in batch)
    for path in PATHS:
        runner = PathRunner(base, config, path, device, tiny)
        runner.train(1)
        runner.evaluate(1)
        del runner
    runners = {}
    for path in PATHS:
        say(f"{name}: {path} path, memory (warm-up of {settings.warmup} training step(s))")
        probe = MemoryProbe(device)
        runner = PathRunner(base, config, path, device, batch)
        runner.train(settings.warmup)
        synchronize(device)
        probe.sample_steady()
        runner.evaluate(1)
        synchronize(device)
        result["paths"][path] = {"fused": runner.config.fused,
                                 "precision": choose_precision(runner.config, device)[0],
                                 "memory": probe.result()}
        if path == PATHS[-1]:
            runners[path] = runner  # warm already: it goes on to the timing phase
        del runner
    for path in PATHS:  # the others are built again, now side by side, and warmed up once more
        if path not in runners:
            runners[path] = PathRunner(base, config, path, device, batch)
            runners[path].train(1)
            runners[path].evaluate(1)
        try:  # one more training step, its operations counted (a diagnostic: never fatal)
            result["paths"][path]["train_ops_per_step"] = count_ops(functools.partial(runners[path].train, 1))
        except Exception as error:
            result["paths"][path]["train_ops_per_step"] = {"total": None, "error": _error_text(error)}
    seconds = {path: {"train": [], "eval": []} for path in PATHS}
    for phase in ("train", "eval"):
        for window in range(settings.windows):
            say(f"{name}: {phase} window {window + 1}/{settings.windows}")
            for path in (PATHS if window % 2 == 0 else PATHS[::-1]):
                action = getattr(runners[path], "train" if phase == "train" else "evaluate")
                seconds[path][phase].append(timed(device, lambda: action(settings.steps_per_window)))
    del runners

    for path in PATHS:
        entry = result["paths"][path]
        for phase in ("train", "eval"):
            windows = seconds[path][phase]
            entry[f"{phase}_tokens_per_second"] = tokens * settings.steps_per_window / statistics.median(windows)
            entry[f"{phase}_window_seconds"] = windows
        if rate:
            entry["matmul_fraction"] = flops["train"] * entry["train_tokens_per_second"] / rate
            entry["eval_matmul_fraction"] = flops["forward"] * entry["eval_tokens_per_second"] / rate
    reference, fused = result["paths"]["reference"], result["paths"]["fused"]
    result["speedup"] = {phase: fused[f"{phase}_tokens_per_second"] / reference[f"{phase}_tokens_per_second"]
                         for phase in ("train", "eval")}
    # Windows of the two paths run back to back, so the ratio within a pair of windows sees the
    # same machine load; their median is the steadier figure on a shared machine.
    result["speedup_paired"] = {phase: statistics.median(
        r / f for r, f in zip(seconds["reference"][phase], seconds["fused"][phase])) for phase in ("train", "eval")}
    result["memory_ratio"] = {key: _ratio(fused["memory"].get(key), reference["memory"].get(key))
                              for key in ("steady_mb", "peak_mb")}
    result["ops_ratio"] = _ratio(fused["train_ops_per_step"]["total"], reference["train_ops_per_step"]["total"])
    return result


def _ratio(numerator, denominator):
    if numerator is None or not denominator or denominator <= 0:
        return None
    return numerator / denominator


# ----------------------------------------------------------------------------------------------
# The whole benchmark, its table and its JSON


def command_line(argv=None):
    """The command as typed (for the record), from `argv` or the process's own arguments."""
    return " ".join([PROG] + list(sys.argv[1:] if argv is None else argv))


def environment(device, command=None):
    info = dict(environment_record(device),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=command or command_line(), threads=torch.get_num_threads(),
                cpu_count=os.cpu_count())
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def run_benchmark(settings, device, command=None):
    """Every model of `settings` on `device`: the JSON-ready dictionary of the results."""
    result = {"environment": environment(device, command), "settings": settings.to_dict(), "models": []}
    say("matmul rate" + (" (bf16, 8192^3)" if device.type == "cuda" else " (fp32, 2048^3)"))
    rate = matmul_rate(device)
    result["matmul_rate"] = rate
    result["errors"] = {}
    started = time.perf_counter()
    for name in settings.models:
        try:
            result["models"].append(benchmark_model(name, settings, device, rate["flops_per_second"]))
        except Exception as error:  # one model's failure (say, a kernel this device lacks) keeps the rest
            result["errors"][name] = _error_text(error)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - started
    if device.type != "cuda":
        try:
            result["environment"]["load_average_after"] = os.getloadavg()
        except OSError:
            pass
    return result


def _number(value, digits=0, prefix=""):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{prefix}{value:,.{digits}f}"


def format_table(result):
    """The benchmark as an aligned text table: per model, both paths and their ratio."""
    rate = result.get("matmul_rate") or {}
    fraction_header = f"% {rate.get('dtype', '')} mm".strip()
    header = ("model", "path", "train tok/s", "eval tok/s", "steady MiB", "peak MiB",
              "ops/step", "train GF/tok", fraction_header)
    rows = []
    for model in result["models"]:
        for path in PATHS:
            entry = model["paths"][path]
            memory = entry["memory"]
            rows.append((model["model"], f"{path} ({entry['precision']})",
                         _number(entry["train_tokens_per_second"]), _number(entry["eval_tokens_per_second"]),
                         _number(memory.get("steady_mb")), _number(memory.get("peak_mb")),
                         _number((entry.get("train_ops_per_step") or {}).get("total")),
                         _number(model["flops_per_token"]["train"] / 1e9, 3),
                         _number(100 * entry["matmul_fraction"], 1) if "matmul_fraction" in entry else "-"))
        rows.append((model["model"], "fused / reference", _number(model["speedup"]["train"], 2, "x"),
                     _number(model["speedup"]["eval"], 2, "x"),
                     _number(model["memory_ratio"]["steady_mb"], 2), _number(model["memory_ratio"]["peak_mb"], 2),
                     _number(model.get("ops_ratio"), 2), "", ""))
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(widths[i]) if i < 2 else str(cell).rjust(widths[i])
                       for i, cell in enumerate(row)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    environment_ = result["environment"]
    settings = result["settings"]
    title = (f"{environment_['device_name']} ({environment_['device']}), torch {environment_['torch']}, "
             f"batch {settings['batch_size']} x length {settings['sequence_length']}, vocabulary "
             f"{settings['vocabulary_size']:,}, frozen embeddings; median of {settings['windows']} "
             f"window(s) of {settings['steps_per_window']} step(s)")
    notes = []
    if rate:
        notes.append(f"matmul rate measured: {rate['flops_per_second'] / 1e12:.2f} TFLOP/s "
                     f"({rate['dtype']}, {rate['size']}^3)")
    if settings["reduced"]:
        notes.append("--quick reduced: " + "; ".join(settings["reduced"]))
    for name, error in (result.get("errors") or {}).items():
        notes.append(f"{name} failed: {error}")
    return "\n".join([title] + notes + [""] + lines)


# ----------------------------------------------------------------------------------------------
# The GPU check: the benchmark and one epoch of configurations 2 and 6 on the real data


def default_data_folder():
    shared = shared_data_path("wikitext2")
    return shared if shared and os.path.isdir(shared) else "data"


def epoch_run(exp_id, args, device):
    """One training epoch of preset `exp_id` on the real data via run_exp; its figures."""
    pretrained = os.path.join(args.data_folder, EMBEDDINGS_FILE)
    embeddings = None if os.path.isfile(pretrained) else "none"
    config = resolve_config(exp_id, data_folder=args.data_folder, embeddings=embeddings, epochs=1,
                            batch_size=args.batch_size, sequence_length=args.sequence_length,
                            limit_batches=args.limit_batches)
    with tempfile.TemporaryDirectory() as log_dir:
        log = run_experiment(config, RunOptions(log_dir=log_dir, write_logs=False, device=str(device),
                                                progress_bar=False, print_every=0))
    (epoch,) = log["epochs"]
    return {"exp_id": exp_id, "config": log["config"], "embeddings": "learned" if embeddings else "pretrained, frozen",
            "parameters": log["parameters"], "environment": log["environment"],
            "train_seconds": epoch["train_seconds"], "valid_seconds": epoch["valid_seconds"],
            "train_tokens": epoch["train_tokens"], "train_tokens_per_second": epoch["train_tokens_per_second"],
            "valid_tokens_per_second": epoch["valid_tokens_per_second"], "train_ppl": epoch["train_ppl"],
            "valid_ppl": epoch["valid_ppl"], "test_ppl": (log["test"] or {}).get("ppl"),
            "gpu_memory_mb": epoch["gpu_memory_mb"], "cpu_rss_mb": epoch["cpu_rss_mb"],
            "flops_per_token": model_flops_per_token(config)}


def gpu_check(args, device):
    """Benchmark, then one epoch of configurations 2 and 6; everything in one JSON file."""
    started = time.perf_counter()
    report = {"gpu_check": {"command": args.command,
                            "data_folder": args.data_folder, "limit_batches": args.limit_batches},
              "benchmark": None, "epochs": {}, "errors": {}}
    settings = Settings(device, args.models, args.batch_size, args.sequence_length, args.windows,
                        args.steps_per_window, args.warmup, args.quick)
    try:
        report["benchmark"] = run_benchmark(settings, device, args.command)
        report["errors"].update({f"benchmark of {name}": error
                                 for name, error in report["benchmark"]["errors"].items()})
        print(format_table(report["benchmark"]), flush=True)
    except Exception as error:  # keep going: the epochs are worth having on their own
        report["errors"]["benchmark"] = _error_text(error)
    write_json(args.json, report)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for exp_id in ("2", "6"):
        say(f"one epoch of configuration {exp_id} on {args.data_folder}")
        try:
            run = report["epochs"][exp_id] = epoch_run(exp_id, args, device)
            rate = (report["benchmark"] or {}).get("matmul_rate", {}).get("flops_per_second")
            if rate and run["train_tokens_per_second"]:
                run["matmul_fraction"] = run["flops_per_token"]["train"] * run["train_tokens_per_second"] / rate
        except Exception as error:
            report["errors"][f"epoch {exp_id}"] = _error_text(error)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(args.json, report)
    report["gpu_check"]["seconds"] = time.perf_counter() - started
    write_json(args.json, report)
    print(format_epochs(report), flush=True)
    return report


def _error_text(error):
    say("failed: " + "".join(traceback.format_exception_only(type(error), error)).strip())
    traceback.print_exc(file=sys.stderr)
    return f"{type(error).__name__}: {error}"


def format_epochs(report):
    lines = []
    for exp_id, run in report["epochs"].items():
        memory = (run.get("gpu_memory_mb") or {}).get("peak_reserved")
        lines.append(f"config {exp_id} ({run['config']['model']} x{run['config']['layers']}, embeddings "
                     f"{run['embeddings']}): one epoch {run['train_seconds']:.1f} s train "
                     f"({run['train_tokens_per_second']:,.0f} tokens/s), {run['valid_seconds']:.1f} s valid, "
                     f"valid ppl {run['valid_ppl']:.1f}"
                     + (f", peak reserved {memory:,.0f} MiB" if memory is not None else ""))
    for part, error in report["errors"].items():
        lines.append(f"error in {part}: {error}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def model_list(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no model or an unknown one ({', '.join(unknown)}): "
                                         f"valid models are {', '.join(MODELS)}")
    return names


def parse_args(argv=None):
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    add("--quick", action="store_true",
        help=f"a short run: models {','.join(QUICK_MODELS)}, batch 1, 3 windows of 1 step (flags given win)")
    add("--json", default=None, help="also write the results to this JSON file")
    add("--models", type=model_list, default=None,
        help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    add("--batch_size", type=positive_int, default=None, help="sequences per batch (default: 16)")
    add("--sequence_length", type=positive_int, default=None, help="tokens per sequence (default: 256)")
    add("--windows", type=positive_int, default=None, help="timed windows per path (default: 5 on CUDA, 3 on the CPU)")
    add("--steps_per_window", type=positive_int, default=None, help="steps per window (default: 10 on CUDA, 1 on the CPU)")
    add("--warmup", type=positive_int, default=None, help="warm-up training steps (default: 3 on CUDA, 1 on the CPU)")
    add("--gpu-check", dest="gpu_check", action="store_true",
        help="the benchmark, then one epoch of configurations 2 and 6 on the real data, into one JSON "
             "file (default: gpu_check.json)")
    add("--data_folder", default=None,
        help="for --gpu-check: wiki.*.npz (default: $SHARED_DATA_DIR/wikitext2 when present, else data)")
    add("--limit_batches", type=positive_int, default=None, help=argparse.SUPPRESS)  # tests: short epochs
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.command = command_line([str(a) for a in argv] if argv is not None else None)
    try:
        if args.gpu_check and args.device is None and not torch.cuda.is_available():
            raise UsageError("--gpu-check measures a GPU and none is available here; "
                                 "--device cpu makes it a (slow) dry run on the CPU")
        device = resolve_device(args.device)
        if args.gpu_check:
            args.data_folder = args.data_folder or default_data_folder()
            args.json = args.json or "gpu_check.json"
            for split in SPLITS:
                path = split_path(args.data_folder, split)
                if not os.path.isfile(path):
                    raise UsageError(f"--gpu-check needs the real data: {path} is missing (give "
                                         "--data_folder, or make it with `python -m utils.prepare_data`)")
            if device.type != "cuda":
                say(f"--gpu-check on {device}: a dry run of the GPU check, not a GPU measurement")
            report = gpu_check(args, device)
            return 1 if report["errors"] else 0
        settings = Settings(device, args.models, args.batch_size, args.sequence_length, args.windows,
                            args.steps_per_window, args.warmup, args.quick)
        result = run_benchmark(settings, device, args.command)
        print(format_table(result), flush=True)
        if args.json:
            write_json(args.json, result)
            say(f"wrote {args.json}")
        return 1 if result["errors"] else 0
    except UsageError as error:
        return fail(PROG, error)


if __name__ == "__main__":
    sys.exit(main())
