"""Train one (or several) of the course's 12 language-model experiments on Wikitext-2.

    python run_exp.py --exp_id 6                 # preset 6: MiniGPT1, 1 layer, AdamW
    python run_exp.py --exp_id all               # the 12 in turn, skipping finished ones
    python run_exp.py --exp_id 6 --resume        # continue after an interruption
    python run_exp.py --exp_id mine --model gpt1 --layers 2 --optimizer sgd --lr 0.1
    torchrun --nproc_per_node 4 run_exp.py --exp_id 12

The course's command line over the library: flags -> configs (utils/config.py) -> run_experiment
(utils/training.py), which writes LOG_DIR/EXP_ID/log.json after every epoch and the checkpoints
last.pt and best.pt.
"""
import json
import os
import sys

import torch.distributed as dist

from utils.checkpoint import CheckpointError
from utils.cli import OneLineParser, UsageError, fail
from utils.config import MODELS, OPTIMIZERS, PRECISIONS, SCHEDULERS, expand_exp_ids, resolve_config
from utils.data_utils import LogError
from utils.prepare_data import DataUnavailableError
from utils.training import RunOptions, TrainingStopped, existing_run, run_experiment

PROG = "run_exp.py"


def parse_args(argv=None):
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--exp_id", default="custom",
        help="1..12 for the course's presets, 'all' or a list like 1,2,5, or a name for a custom run")
    add("--print_config", action="store_true", help="print the resolved configuration as JSON and exit")
    # The course's flags; set, they override the preset.
    add("--data_folder", default=None, help="folder with wiki.{train,validation,test}.npz (default: data)")
    add("--batch_size", type=int, default=None, help="global batch size (default: 16)")
    add("--model", choices=MODELS, default=None, help="architecture (default: lstm)")
    add("--embeddings", default=None,
        help="pretrained embeddings .npz (default: DATA_FOLDER/embeddings.npz), or 'none' to learn them")
    add("--layers", type=int, default=None, help="number of LSTM layers or transformer blocks (default: 1)")
    add("--epochs", type=int, default=None, help="number of epochs (default: 10)")
    add("--optimizer", choices=OPTIMIZERS, default=None, help="optimizer (default: adam)")
    add("--lr", type=float, default=None, help="learning rate (default: 1e-3)")
    add("--momentum", type=float, default=None, help="momentum of the 'momentum' optimizer (default: 0.9)")
    add("--weight_decay", type=float, default=None, help="weight decay of adamw/sgd/momentum (default: 5e-4)")
    add("--seed", type=int, default=None, help="random seed (default: 42)")
    add("--log", action="store_true", help="accepted for the course's CLI: logs are always written")
    add("--no_log", action="store_true", help="write no log and no checkpoint")
    add("--log_dir", default="logs", help="runs go to LOG_DIR/EXP_ID/")
    add("--num_workers", type=int, default=0, help="accepted for the course's CLI: the data is preloaded")
    add("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    add("--progress_bar", action="store_true", default=None, help="show progress bars (default: in a terminal)")
    add("--no_progress_bar", dest="progress_bar", action="store_false", help="hide progress bars")
    add("--print_every", type=int, default=10, help="without progress bars, print every N steps (0: never)")
    # Sizes (with --embeddings none), quick runs, and the options that are off unless asked for.
    add("--embedding_size", type=int, default=None, help="embedding width (default: 768)")
    add("--hidden_size", type=int, default=None, help="LSTM hidden size (default: 512)")
    add("--num_heads", type=int, default=None, help="attention heads (default: 12)")
    add("--sequence_length", type=int, default=None, help="tokens per example (default: 256)")
    add("--limit_batches", type=int, default=None, help="at most K batches per split and epoch")
    add("--max_steps", type=int, default=None, help="stop training after S optimizer steps in all")
    add("--scheduler", choices=SCHEDULERS, default=None, help="learning-rate schedule (default: none)")
    add("--clip_grad_norm", type=float, default=None, help="clip the gradient norm to this value")
    add("--precision", choices=PRECISIONS, default=None,
        help="auto: bf16 autocast on CUDA (with loss scaling), fp32 on the CPU; fp32 turns mixed "
             "precision off")
    add("--no_fused", dest="fused", action="store_false", default=None,
        help="the reference path: the course's explicit attention and dense log-probabilities")
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


def run_configs(configs, args):
    """Run each config; with several, finished runs are skipped and interrupted ones resumed."""
    several = len(configs) > 1
    for config in configs:
        options = RunOptions(log_dir=args.log_dir, write_logs=not args.no_log, resume=args.resume,
                             overwrite=args.overwrite, device=args.device,
                             progress_bar=args.progress_bar, print_every=args.print_every,
                             num_workers=args.num_workers)
        if several and options.write_logs:
            log, has_checkpoint = existing_run(os.path.join(args.log_dir, config.exp_id))
            if log is not None and log["status"] == "finished":
                print(f"exp {config.exp_id}: finished already, skipped")
                continue
            options.resume = options.resume or has_checkpoint
        run_experiment(config, options)


def main(argv=None):
    try:
        args = parse_args(argv)
        configs = configs_from_args(args)
        if args.print_config:
            resolved = [config.to_dict() for config in configs]
            print(json.dumps(resolved[0] if len(resolved) == 1 else resolved, indent=2))
            return 0
        run_configs(configs, args)
        return 0
    except (UsageError, ValueError, FileNotFoundError, CheckpointError, LogError,
            DataUnavailableError) as error:
        return fail(PROG, error, 2)
    except TrainingStopped as error:
        return fail(PROG, error, 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
