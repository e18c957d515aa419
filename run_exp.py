"""Train one (or several) of the course's 12 language-model experiments on Wikitext-2.

    python run_exp.py --exp_id 6                 # preset 6: MiniGPT1, 1 layer, AdamW
    python run_exp.py --exp_id all               # the 12 in turn, skipping finished ones
    python run_exp.py --exp_id 6 --resume        # continue after an interruption
    python run_exp.py --exp_id mine --model gpt1 --layers 2 --optimizer sgd --lr 0.1
    torchrun --nproc_per_node 4 run_exp.py --exp_id 12

The course's command line over the library: flags -> configs (utils/config.py) -> run_experiment
(utils/experiment.py), which writes LOG_DIR/EXP_ID/log.json after every epoch and the checkpoints
last.pt and best.pt. `train` and `evaluate` are the course's one-pass functions (utils/course.py),
for the course's notebook: `from run_exp import train, evaluate`.
"""
import functools
import json
import os
import sys
import time

import torch.distributed as dist

from utils.checkpoint import CheckpointError
from utils.cli import OneLineParser, UsageError, fail, nonnegative_int, one_line_warnings, positive_int
from utils.config import MODELS, OPTIMIZERS, PRECISIONS, SCHEDULERS, expand_exp_ids, resolve_config
from utils.course import evaluate, train  # noqa: F401 (the course's notebook imports them from here)
from utils.data_utils import LogError
from utils.files import describe_os_error
from utils.study import (StudyInterrupted, die_with_parent, exit_code, run_in_parallel, run_in_turn,
                         summary_table, worker_command_line)
from utils.experiment import RunOptions, fetch_inputs, run_experiment, signals_interrupt
from utils.training import TrainingStopped

PROG = "run_exp.py"


def parse_args(argv=None):
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--exp_id", default="custom",
        help="1..12 for the course's presets, 'all' or a list like 1,2,5, or a name for a custom run")
    add("--print_config", action="store_true", help="print the resolved configuration as JSON and exit")
    # The course's flags; set, they override the preset.
    add("--data_folder", default=None, help="folder with wiki.{train,validation,test}.npz (default: data)")
    add("--batch_size", type=positive_int, default=None, help="global batch size (default: 16)")
    add("--model", choices=MODELS, default=None, help="architecture (default: lstm)")
    add("--embeddings", default=None,
        help="pretrained embeddings .npz (default: DATA_FOLDER/embeddings.npz), or 'none' to learn them")
    add("--layers", type=positive_int, default=None, help="number of LSTM layers or transformer blocks (default: 1)")
    add("--epochs", type=positive_int, default=None, help="number of epochs (default: 10)")
    add("--optimizer", choices=OPTIMIZERS, default=None, help="optimizer (default: adam)")
    add("--lr", type=float, default=None, help="learning rate (default: 1e-3)")
    add("--momentum", type=float, default=None, help="momentum of the 'momentum' optimizer (default: 0.9)")
    add("--weight_decay", type=float, default=None, help="weight decay of adamw/sgd/momentum (default: 5e-4)")
    add("--seed", type=int, default=None, help="random seed (default: 42)")
    add("--log", action="store_true", help="accepted for the course's CLI: logs are always written")
    add("--no_log", action="store_true", help="write no log and no checkpoint")
    add("--log_dir", default="logs", help="runs go to LOG_DIR/EXP_ID/")
    add("--num_workers", type=nonnegative_int, default=0, help="accepted for the course's CLI: the data is preloaded")
    add("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    add("--progress_bar", action="store_true", default=None, help="show progress bars (default: in a terminal)")
    add("--no_progress_bar", dest="progress_bar", action="store_false", help="hide progress bars")
    add("--print_every", type=nonnegative_int, default=10, help="without progress bars, print every N steps (0: never)")
    # Sizes (with --embeddings none), quick runs, and the options that are off unless asked for.
    add("--embedding_size", type=positive_int, default=None, help="embedding width (default: 768)")
    add("--hidden_size", type=positive_int, default=None, help="LSTM hidden size (default: 512)")
    add("--num_heads", type=positive_int, default=None, help="attention heads (default: 12)")
    add("--sequence_length", type=positive_int, default=None, help="tokens per example (default: 256)")
    add("--dropout", type=float, default=None,
        help="dropout probability: MiniGPT1 as GPT-1 (embeddings, attention, residual branches), "
             "the LSTM on its embeddings, between layers and on its output (default: 0, the course's models)")
    add("--limit_batches", type=positive_int, default=None, help="at most K batches per split and epoch")
    add("--max_steps", type=positive_int, default=None, help="stop training after S optimizer steps in all")
    add("--scheduler", choices=SCHEDULERS, default=None, help="learning-rate schedule (default: none)")
    add("--clip_grad_norm", type=float, default=None, help="clip the gradient norm to this value")
    add("--precision", choices=PRECISIONS, default=None,
        help="auto (the default): bf16 autocast on GPUs with native bf16 (sm_80+), fp16 with loss "
             "scaling on older ones (a T4), fp32 on the CPU and on the reference path")
    add("--no_fused", dest="fused", action="store_false", default=None,
        help="the reference path: the course's explicit attention and dense log-probabilities")
    add("--compile", action="store_true", default=None, help="torch.compile the model and loss")
    add("--resume", action="store_true", help="continue the run in LOG_DIR/EXP_ID from last.pt")
    add("--overwrite", action="store_true",
        help="start again: what LOG_DIR/EXP_ID holds is deleted once the new run has written its log")
    add("--jobs", type=positive_int, default=1,
        help="with several ids: run up to K at once, each in a process of its own on the same device")
    return parser.parse_args(argv)


OVERRIDES = ("data_folder", "batch_size", "model", "embeddings", "layers", "epochs", "optimizer",
             "lr", "momentum", "weight_decay", "seed", "embedding_size", "hidden_size", "num_heads",
             "sequence_length", "dropout", "limit_batches", "max_steps", "scheduler", "clip_grad_norm",
             "precision", "fused", "compile")


def configs_from_args(args):
    overrides = {name: getattr(args, name) for name in OVERRIDES}
    if args.embedding_size is not None and args.embeddings != "none":
        raise UsageError(f"--embedding_size={args.embedding_size} applies only with --embeddings none: "
                         "pretrained embeddings fix the width; add --embeddings none or drop the flag")
    return [resolve_config(exp_id, **overrides) for exp_id in expand_exp_ids(args.exp_id)]


FAILURES = (UsageError, ValueError, FileNotFoundError, CheckpointError, LogError, TrainingStopped)


def run_set(configs, args, argv):
    """Several configs: in turn, or `--jobs` at a time; the summary table at the end."""
    options = run_options(args)
    if args.jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--jobs runs processes of its own: use it without torchrun")
    started = time.perf_counter()
    try:
        if args.jobs > 1:
            # Once, here: K workers preparing one data folder at the same moment would collide.
            for config in {(config.data_folder, config.embeddings): config for config in configs}.values():
                fetch_inputs(config, options.progress_bar)
            outcomes = run_in_parallel(configs, functools.partial(worker_command_line, argv), options,
                                       args.jobs)
        else:
            outcomes = run_in_turn(configs, options, run_experiment, FAILURES)
    except StudyInterrupted as stopped:
        print(summary_table(stopped.outcomes), flush=True)
        raise
    print(f"\n{len(configs)} configuration(s) in {time.perf_counter() - started:.1f} s:")
    print(summary_table(outcomes), flush=True)
    return exit_code(outcomes)


def run_options(args):
    return RunOptions(log_dir=args.log_dir, write_logs=not args.no_log, resume=args.resume,
                      overwrite=args.overwrite, device=args.device, progress_bar=args.progress_bar,
                      print_every=args.print_every, num_workers=args.num_workers)


def main(argv=None):
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    one_line_warnings()
    die_with_parent()  # only in a --jobs worker
    try:
        with signals_interrupt():
            args = parse_args(argv)
            configs = configs_from_args(args)
            if args.print_config:
                resolved = [config.to_dict() for config in configs]
                print(json.dumps(resolved[0] if len(resolved) == 1 else resolved, indent=2))
                return 0
            if len(configs) > 1:
                return run_set(configs, args, argv)
            run_experiment(configs[0], run_options(args))
            return 0
    except FAILURES as error:
        return fail(PROG, error)
    except OSError as error:
        return fail(PROG, f"{error.filename or 'a file'}: {describe_os_error(error)}", 2)
    except KeyboardInterrupt as interrupt:
        print(f"{PROG}: stopped; continue with the same command and --resume", file=sys.stderr)
        return getattr(interrupt, "exit_code", 130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
