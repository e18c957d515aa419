"""Several configurations in one command: one after the other, or K at a time as worker processes.

    run_exp.py --exp_id all              the 12 presets in turn, in this process
    run_exp.py --exp_id all --jobs 3     up to 3 at once, each in a `run_exp.py` process of its own

Either way a finished run is skipped, an unfinished one is continued (as with `--resume`), a run
that fails is reported and the others go on, and a table sums up each run at the end. A worker is
the same command line for one id, so its numbers equal those of that configuration run alone; its
output goes to LOG_DIR/EXP_ID/output.txt, and the parent prints one line per finished epoch.
Ctrl-C (or SIGTERM) stops every worker, each recording "stopped"; `--resume` continues the set.
"""
import concurrent.futures
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

from utils.cli import UsageError
from utils.data_utils import LOG_NAME, LogError, read_log
from utils.files import check_writable_folder, describe_os_error
from utils.run_folder import FolderContents, RunLock
from utils.experiment import Interrupted, check_same_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_EXP = os.path.join(ROOT, "run_exp.py")
POLL_SECONDS = 0.5


@dataclasses.dataclass
class Outcome:
    """How one configuration of the set ended."""

    exp_id: str
    status: str  # finished | skipped (finished already) | failed | stopped
    seconds: float = 0.0
    message: Optional[str] = None
    exit_code: int = 0
    log: Optional[dict] = None


def folder_plan(config, options):
    """`(skip, resume)` for one config of a set.

    A run that finished with this configuration and its epochs is skipped; any other run the folder
    holds is continued (and refused by the run itself, naming the difference, when its flags
    differ); `--overwrite` starts every run again.
    """
    if not options.write_logs or options.overwrite:
        return False, False
    contents = FolderContents(os.path.join(options.log_dir, config.exp_id))
    if contents.finished and contents.epochs_logged >= config.epochs:
        try:
            check_same_config(config, contents.log["config"])
            return True, False
        except UsageError:
            return False, True
    return False, not contents.empty


def read_run_log(log_dir, exp_id):
    try:
        return read_log(os.path.join(log_dir, exp_id, LOG_NAME))
    except LogError:
        return None


def summary_table(outcomes):
    """One line per configuration: status, best validation and test perplexity, wall time."""
    header = ("exp", "status", "best valid ppl", "test ppl", "wall time", "note")
    rows = []
    for outcome in outcomes:
        log = outcome.log or {}
        best = (log.get("best") or {}).get("valid_ppl")
        test = (log.get("test") or {}).get("ppl")
        rows.append((outcome.exp_id, outcome.status, "-" if best is None else f"{best:.2f}",
                     "-" if test is None else f"{test:.2f}", f"{outcome.seconds:.1f} s",
                     outcome.message.splitlines()[0] if outcome.message else ""))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def exit_code(outcomes):
    """0 when every run finished (or had finished); else the first failure's code."""
    for outcome in outcomes:
        if outcome.exit_code:
            return outcome.exit_code
    return 0


# ----------------------------------------------------------------------------------------------
# One after the other, in this process


def run_in_turn(configs, options, run_one, failures):
    """Run each config with `run_one(config, options)`; `failures` maps exceptions to exit codes."""
    outcomes = []
    for config in configs:
        skip, resume = folder_plan(config, options)
        if skip:
            print(f"exp {config.exp_id}: finished already, skipped")
            outcomes.append(Outcome(config.exp_id, "skipped", log=read_run_log(options.log_dir, config.exp_id)))
            continue
        started = time.perf_counter()
        try:
            log = run_one(config, dataclasses.replace(options, resume=options.resume or resume))
            outcomes.append(Outcome(config.exp_id, "finished", time.perf_counter() - started, log=log))
        except KeyboardInterrupt as interrupt:
            code = interrupt.exit_code if isinstance(interrupt, Interrupted) else 130
            outcomes.append(Outcome(config.exp_id, "stopped", time.perf_counter() - started,
                                    "stopped; continue with --resume", code,
                                    read_run_log(options.log_dir, config.exp_id)))
            raise StudyInterrupted(outcomes, code) from None
        except failures as error:
            code = getattr(error, "exit_code", 2)
            print(f"exp {config.exp_id}: error: {error}", file=sys.stderr)
            outcomes.append(Outcome(config.exp_id, "failed", time.perf_counter() - started, str(error), code,
                                    read_run_log(options.log_dir, config.exp_id)))
    return outcomes


class StudyInterrupted(KeyboardInterrupt):
    """The set was stopped by a signal; `outcomes` holds what was done, `exit_code` 128 + signal."""

    def __init__(self, outcomes, exit_code):
        super().__init__("stopped")
        self.outcomes = outcomes
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------
# K at a time, as worker processes


# Set in a worker's environment: the PID of the parent it dies with (see `die_with_parent`).
PARENT_ENV = "RUN_EXP_PARENT_PID"
PARENT_POLL_SECONDS = 0.5


def die_with_parent():
    """In a `--jobs` worker: SIGTERM this process once its parent is gone (a kill -9 of the parent
    would otherwise leave it training on, unseen), so that it records "stopped" and can be resumed.

    A thread watches the parent's PID rather than Linux's parent-death signal, which fires when the
    parent's *thread* that started the worker ends, and exists on Linux only.
    """
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent or not parent.isdecimal():
        return

    def watch():
        while os.getppid() == int(parent):
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_command_line(argv, exp_id, resume):
    """`run_exp.py`'s command line `argv` for one id, without bars: what a `--jobs` worker runs."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--exp_id", "--jobs"):
            skip = True
        elif not arg.startswith(("--exp_id=", "--jobs=")):
            kept.append(arg)
    command = [sys.executable, RUN_EXP, *kept, "--exp_id", exp_id, "--no_progress_bar"]
    return command + (["--resume"] if resume and "--resume" not in kept else [])


class Worker:
    """One configuration in a `run_exp.py` process of its own, and what the parent sees of it."""

    def __init__(self, exp_id, command, log_dir, env=None):
        self.exp_id, self.command, self.log_dir, self.env = exp_id, command, log_dir, env
        self.process = None
        self.started = None
        log = read_run_log(log_dir, exp_id)  # a resumed run's earlier epochs are not news
        self.reported_epochs = len(log["epochs"]) if log else 0
        self.lock = threading.Lock()
        self.cancelled = False  # stopped: start no process, and signal a running one once
        self.failure = None  # why the process could not be started

    def run(self):
        """Start the process (unless the set was stopped first) and wait for it: its exit code.

        The parent locks the run folder and hands the lock to the worker (an inherited file
        descriptor, `RunLock.HANDED_FD`): a folder in use by another command is refused before its
        output.txt is touched, and output.txt only ever holds the output of the folder's owner.
        """
        with self.lock:
            if self.cancelled:
                return None
            self.started = time.perf_counter()
            run_dir = os.path.join(self.log_dir, self.exp_id)
            path = os.path.join(run_dir, "output.txt")
            try:
                check_writable_folder(run_dir, "--exp_id or --log_dir")
                lock = RunLock(run_dir).acquire()
            except UsageError as error:  # a file, unwritable, or in use by another command
                self.failure = str(error)
                return 2
            try:
                output = open(path, "ab")
            except OSError as error:
                lock.release()
                self.failure = f"cannot write {path}: {describe_os_error(error)}"
                return 2
            with output:
                try:
                    # A session of its own: Ctrl-C reaches the parent alone, which stops each worker once.
                    self.process = subprocess.Popen(
                        self.command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=lock.handed_fds(),
                        env=dict(self.env or os.environ, **lock.handed_env(), **{PARENT_ENV: str(os.getpid())}))
                except OSError as error:  # too many processes or open files, no memory
                    lock.release()
                    self.failure = f"cannot start a worker: {describe_os_error(error)}"
                    return 2
                lock.hand_over()
        print(f"exp {self.exp_id}: started (pid {self.process.pid}, output in {path})", flush=True)
        return self.process.wait()

    def stop(self):
        with self.lock:
            if self.cancelled:
                return
            self.cancelled = True
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)

    def progress(self):
        """A line for each epoch finished since the last call."""
        if self.process is None:
            return []
        log = read_run_log(self.log_dir, self.exp_id)
        if log is None:
            return []
        lines = []
        epochs = log.get("epochs") or []
        for entry in epochs[self.reported_epochs:]:
            lines.append(f"exp {self.exp_id}: epoch {entry['epoch']}/{log['config'].get('epochs')}: "
                         f"train ppl {entry.get('train_ppl') or float('nan'):.2f}, valid ppl "
                         f"{entry.get('valid_ppl') or float('nan'):.2f} "
                         f"({time.perf_counter() - self.started:.0f} s)")
        self.reported_epochs = max(self.reported_epochs, len(epochs))
        return lines

    def outcome(self, code):
        """The Outcome of an exit code (None: never started; negative: killed by that signal)."""
        if code is None:
            return Outcome(self.exp_id, "not started", 0.0, "the set was stopped first", 130)
        seconds = time.perf_counter() - self.started
        log = read_run_log(self.log_dir, self.exp_id)
        code = 128 - code if code < 0 else code
        if code == 0:
            return Outcome(self.exp_id, "finished", seconds, log=log)
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            return Outcome(self.exp_id, "stopped", seconds, "stopped; continue with --resume", code, log)
        return Outcome(self.exp_id, "failed", seconds,
                       self.failure or last_error_line(self.log_dir, self.exp_id, log), code, log)


def last_error_line(log_dir, exp_id, log):
    """Why a worker failed: its log's message, else the last line of its output."""
    if log and log.get("message"):
        return log["message"]
    try:
        with open(os.path.join(log_dir, exp_id, "output.txt"), encoding="utf-8", errors="replace") as file:
            lines = [line.strip() for line in file if line.strip()]
        return lines[-1].split(": error: ", 1)[-1] if lines else "no output"
    except OSError:
        return "no output"


def run_in_parallel(configs, worker_command, options, jobs):
    """Up to `jobs` workers at once; `worker_command(exp_id, resume)` is each one's command line."""
    outcomes, workers, log_dir = {}, [], options.log_dir
    exp_ids = [config.exp_id for config in configs]
    # K processes that each take every core for their CPU work would fight over them.
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    # output.txt in the order it was printed: a block-buffered stdout put lines printed before an
    # error after it, and the summary quotes the file's last line as the reason a run failed.
    env["PYTHONUNBUFFERED"] = "1"
    for config in configs:
        skip, resume = folder_plan(config, options)
        if skip:
            print(f"exp {config.exp_id}: finished already, skipped")
            outcomes[config.exp_id] = Outcome(config.exp_id, "skipped", log=read_run_log(log_dir, config.exp_id))
        else:
            workers.append(Worker(config.exp_id, worker_command(config.exp_id, resume), log_dir, env))
    interrupted = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(worker.run): worker for worker in workers}
        pending = set(futures)
        while pending:
            try:
                # A future leaves `pending` only once its outcome is recorded: a Ctrl-C in between
                # would otherwise drop the run from the summary.
                done, _ = concurrent.futures.wait(pending, timeout=POLL_SECONDS)
                for worker in workers:
                    for line in worker.progress():
                        print(line, flush=True)
                for future in done:
                    worker = futures[future]
                    if worker.exp_id not in outcomes:
                        outcome = outcomes[worker.exp_id] = worker.outcome(future.result())
                        print(f"exp {worker.exp_id}: {outcome.status}"
                              + (f": {outcome.message}" if outcome.status == "failed" else ""), flush=True)
                    pending.discard(future)
            except KeyboardInterrupt as interrupt:  # stop every worker once, then wait for them
                if interrupted is None:
                    interrupted = interrupt.exit_code if isinstance(interrupt, Interrupted) else 130
                    print("stopping every worker; continue the set with the same command and --resume",
                          file=sys.stderr, flush=True)
                for worker in workers:
                    worker.stop()
    ordered = [outcomes[exp_id] for exp_id in exp_ids if exp_id in outcomes]
    if interrupted is not None:
        raise StudyInterrupted(ordered, interrupted)
    return ordered
