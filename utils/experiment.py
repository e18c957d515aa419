"""A run's life cycle around the training loop: `run_experiment(config, RunOptions(...))`.

    RunOptions        how to run: log folder, resume or overwrite, device, progress
    signals           SIGINT and SIGTERM raise `Interrupted`, so that a stop is recorded
    plan_start        a new run, or where to resume from, after the checks
    inputs            the data (fetched when missing), the model, the three splits
    run_experiment    lock the folder, start or resume, the first log, fit and test (utils/training.py)
    RunLog            the run's log (utils/data_utils.py), written after every epoch

The loop raises; `start_run` alone records how the run ended: "finished", "stopped" (a signal)
or "failed". What a run folder holds, and its lock, is utils/run_folder.py.
"""
import contextlib
import dataclasses
import os
import signal
import sys
from typing import Optional

from utils.checkpoint import CheckpointError, DamagedCheckpointError, read_checkpoint, verify_checkpoint
from utils.cli import UsageError, environment_record
from utils.config import DEFAULT_EMBEDDINGS, ExperimentConfig
from utils.data_folder import SPLITS
from utils.data_utils import LOG_NAME, write_log
from utils.download import Fetcher
from utils.models import count_parameters, model_for_config
from utils.prepare_data import ensure_data
from utils.files import check_writable_folder, describe_os_error
from utils.run_folder import (FolderContents, RunLock, checkpoint_paths, drop_replaced, move_aside,
                              put_back, recover, remove_if_unused, remove_stale_temporaries)
from utils.torch_utils import seed_experiment
from utils.training import (Processes, Trainer, TrainingStopped, check_precision, choose_precision,
                            is_cpu_out_of_memory, out_of_memory_message)
from utils.wikitext2 import Wikitext2


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


# ----------------------------------------------------------------------------------------------
# Signals


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
# Where a run starts: new, or resumed from a checkpoint


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
        if contents.epochs_logged == 0:  # stopped in its first epoch, or a damaged log: start again
            return None, True
        raise UsageError(f"{contents.run_dir} holds {contents.describe()} but no checkpoint to resume "
                         "from: use --overwrite to start again")
    check_same_config(config, payload["config"])
    return payload, False


def keep_damaged_log(contents):
    """Rename a log that cannot be read out of the way, rather than let a new run replace it: it
    may be all that is left of a run, and only its owner can say whether it is worth saving."""
    path = os.path.join(contents.run_dir, LOG_NAME)
    kept, number = f"{path}.damaged", 1
    while os.path.exists(kept):
        number += 1
        kept = f"{path}.damaged-{number}"
    os.replace(path, kept)
    print(f"note: {contents.log_problem}: kept as {kept}; starting the run again", file=sys.stderr)


def check_whole_epochs(state, steps_per_epoch):
    """Refuse to train on after an epoch that `--max_steps` cut short: continued, the run would keep
    that short epoch, and so differ from a run given the larger limit from the start."""
    config, epochs = state.config, state.epochs
    if not epochs or config.max_steps is not None and state.steps >= config.max_steps:
        return  # nothing logged yet, or the limit asked for is the one the run stopped at
    before = epochs[-2]["steps"] if len(epochs) > 1 else 0
    taken = epochs[-1]["steps"] - before
    if taken < steps_per_epoch:
        raise UsageError(f"--resume: epoch {len(epochs)} of this run was cut short by its --max_steps "
                         f"({taken} of {steps_per_epoch} steps), so going on would not give the numbers "
                         f"of a run with --max_steps {config.max_steps or 'none'} from the start: "
                         "use --overwrite to start again with the new limit")


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
# Inputs


def fetch_inputs(config, progress):
    """Prepare the data folder's missing files; the default embeddings file is fetched when missing,
    a file named on the command line never is."""
    ensure_data(config.data_folder, need_embeddings=config.embeddings == DEFAULT_EMBEDDINGS,
                embeddings_path=config.embeddings_path, fetcher=Fetcher(progress=progress))


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
    except (RuntimeError, MemoryError) as error:  # e.g. a causal mask of a huge --sequence_length
        if not is_cpu_out_of_memory(error):
            raise
        raise UsageError(f"not enough memory to build the model and data: "
                         f"{out_of_memory_message(config)}") from None
    return model, data


# ----------------------------------------------------------------------------------------------
# The run's log


def environment(processes, config):
    """The log's record of where and how the run was computed."""
    device = processes.device
    precision, reason = choose_precision(config, device)
    return dict(environment_record(device), world_size=processes.world_size, autocast=precision,
                precision_reason=reason, fused=config.fused, compile=config.compile)


class RunLog:
    """A run's log (format: utils/data_utils.py), written by the main process when logs are on."""

    def __init__(self, config, options, processes, parameters):
        self.path = os.path.join(options.log_dir, config.exp_id, LOG_NAME)
        self.writes_file = options.write_logs and processes.main
        self.log = {"exp_id": config.exp_id, "status": "running", "message": None,
                    "config": config.to_dict(), "environment": environment(processes, config),
                    "parameters": parameters, "epochs": [], "best": None, "test": None}

    def write(self, state, status=None, message=None):
        """The log as `state` has got, with a new status when one is given."""
        if status:
            self.log["status"], self.log["message"] = status, message
        self.log["epochs"], self.log["best"] = state.epochs, state.best
        if self.writes_file:
            write_log(self.path, self.log)

    def end(self, state, status, message):
        """Record how the run ended; a log that cannot be written any more is left as it was."""
        try:
            self.write(state, status, message)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------
# A whole run


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
    check_writable_folder(options.log_dir, "--log_dir")
    new_folder = not os.path.isdir(run_dir)
    check_writable_folder(run_dir, "--exp_id or --log_dir")
    with RunLock(run_dir) as lock:
        try:
            recover(run_dir)
            remove_stale_temporaries(run_dir)
            return start_run(config, options, processes, run_dir)
        finally:
            if new_folder or lock.made_folder:  # still the owner: no other process can use the folder
                remove_if_unused(run_dir)


def start_run(config, options, processes, run_dir):
    """Everything after the folder is ours: the checks, the set-up, the epochs, the test, and the
    one record of how the run ended."""
    contents = FolderContents(run_dir) if options.write_logs else None
    payload, replace_old = plan_start(config, options, contents)
    if replace_old and not options.overwrite and contents.log_problem and processes.main:
        keep_damaged_log(contents)
    if payload is not None:
        config = resumed_config(config, payload)
    seed_experiment(config.seed)
    model, data = load_model_and_data(config, options, processes)
    # Pretrained embeddings fix the width; the log and checkpoints record the model as built.
    config = config.replace(embedding_size=model.embedding_size)
    parameters = count_parameters(model)
    processes.say(f"exp {config.exp_id}: {config.model} x{config.layers} {config.optimizer} on "
                  f"{processes.device} - {parameters['total']:,} parameters, "
                  f"{parameters['learnable']:,} learnable")
    processes.say("precision: {} ({})".format(*choose_precision(config, processes.device)))
    trainer = Trainer(config, processes, model, data,
                      checkpoints=checkpoint_paths(run_dir) if options.write_logs else None,
                      progress=options.progress_bar, print_every=options.print_every)
    run_log = RunLog(config, options, processes, parameters)
    state = trainer.state
    if payload is not None:
        state.restore(payload)
        check_whole_epochs(state, trainer.steps_per_epoch)
        processes.say(f"resuming {run_dir} after epoch {payload['epoch']} ({state.steps} steps)")
    # A signal between the first log and the `try` below would leave that log saying "running"; one
    # within write_first_log could put an old run back beside the new log. They wait until here.
    with HeldSignals() as held:
        write_first_log(run_log, state, run_dir, replace_old and run_log.writes_file)
    try:
        held.release()
        trainer.fit(after_epoch=lambda: run_log.write(state))
        run_log.log["test"] = trainer.test()
        run_log.write(state, "finished")
    except KeyboardInterrupt as interrupt:
        signum = interrupt if isinstance(interrupt, Interrupted) else Interrupted()
        run_log.end(state, "stopped", f"stopped by {signum} after {state.epoch} epoch(s): continue "
                                      "with the same command and --resume")
        raise
    except OSError as error:  # writing the run's files during training: the last good epoch is kept
        where = error.filename or run_dir
        message = (f"cannot write {where} ({describe_os_error(error)}): the files of epoch "
                   f"{state.epoch} are kept; free the disk and continue with --resume")
        run_log.end(state, "failed", message)
        raise TrainingStopped(message) from None
    except Exception as error:  # whatever else ends the run, the log says so rather than "running"
        first_line = str(error).splitlines()[0] if str(error) else ""
        run_log.end(state, "failed", str(error) if isinstance(error, TrainingStopped)
                    else f"{type(error).__name__}: {first_line}")
        raise
    return run_log.log


def write_first_log(run_log, state, run_dir, replace_old):
    """The run's first log; with `replace_old`, the old run is set aside first and dropped after."""
    if replace_old:
        move_aside(run_dir)
    try:
        run_log.write(state)
    except OSError as error:
        if replace_old:
            put_back(run_dir)
        raise UsageError(f"cannot write {run_log.path} ({describe_os_error(error)}): "
                         "free the disk or choose another --log_dir") from None
    except BaseException:
        if replace_old:
            put_back(run_dir)
        raise
    if replace_old:
        drop_replaced(run_dir)
