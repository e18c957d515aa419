"""A run's folder, LOG_DIR/EXP_ID: one owner at a time, what it holds, and an old run moved aside.

    LOG_DIR/EXP_ID/
        .lock             locked (flock) by the process that owns the folder; holds its PID
        log.json          utils/data_utils.py
        last.pt, best.pt  utils/checkpoint.py
        .replaced/        the previous run while `--overwrite` starts a new one; deleted once the
                          new run has written its first log, put back if it never does; its
                          .state says how far the replacement got (see `recover`)

The lock is the operating system's: it dies with its process, so a run killed with SIGKILL leaves
no stale lock, and a log that still says "running" while nobody holds the lock is a dead run.
"""
import contextlib
import glob
import os
import shutil
import time

from utils.cli import UsageError
from utils.data_utils import LOG_NAME, LogError, read_log
from utils.files import TEMPORARY_PREFIX, atomic_write_bytes, describe_os_error

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder is then not protected against a second run
    fcntl = None

LOCK_NAME = ".lock"
REPLACED_NAME = ".replaced"
CHECKPOINT_NAMES = {"last": "last.pt", "best": "best.pt"}
RUN_FILES = (LOG_NAME, *CHECKPOINT_NAMES.values())


def checkpoint_paths(run_dir):
    """{"last": path, "best": path}: where a run saves its checkpoints (utils/checkpoint.py)."""
    return {kind: os.path.join(run_dir, name) for kind, name in CHECKPOINT_NAMES.items()}


def read_owner(file, wait_s=2.0):
    """The PID in a lock file that another process holds, or None. The owner writes its PID just
    after taking the lock, so a reader that comes in between (and finds nothing, or the PID of an
    owner that was killed) waits a moment for it. A PID still not running here after that is named
    all the same: an owner on another machine sharing the folder."""
    deadline = time.monotonic() + wait_s
    while True:
        file.seek(0)
        owner = file.read().strip()
        if owner.isdecimal() and process_exists(int(owner)) or time.monotonic() >= deadline:
            return owner or None
        time.sleep(0.02)


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a number no PID can be
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """The OS lock on a run folder; `acquire` raises UsageError naming the PID of the owner.
    `made_folder` says whether acquiring it had to make the folder again (see `remove_if_unused`)."""

    ATTEMPTS = 3  # to lock a lock file that its owner removed or let go of as we came
    # A process that locked the folder for a child (a `--jobs` parent) names the inherited file
    # descriptor here; the child then owns that very lock instead of taking one.
    HANDED_FD = "RUN_EXP_LOCK_FD"

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.file = None
        self.made_folder = False

    def acquire(self):
        if fcntl is None:
            return self
        if self.take_handed_lock():
            return self
        for attempt in range(1, self.ATTEMPTS + 1):
            last = attempt == self.ATTEMPTS
            try:
                file = open(self.path, "a+")
            except FileNotFoundError as error:
                if last or os.path.isdir(self.run_dir):  # e.g. a .lock that links to nowhere
                    raise UsageError(f"cannot open the lock file {self.path} ({describe_os_error(error)}): "
                                     "remove it if no run of this id is going on, then start again") from None
                # The previous owner removed the folder, its run never started: make it again.
                os.makedirs(self.run_dir, exist_ok=True)
                self.made_folder = True
                continue
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = read_owner(file)
                file.close()
                if owner is None and not last:
                    continue  # the owner let go as we read: try the lock again
                raise UsageError(f"{self.run_dir} is in use by "
                                 f"{f'process {owner}' if owner else 'another process'} (a run of "
                                 "the same id): wait for it to end, or choose another --exp_id / "
                                 "--log_dir") from None
            try:
                if os.fstat(file.fileno()).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            file.close()  # the lock file was removed by its previous owner: lock the new one
        else:
            raise UsageError(f"cannot lock {self.path}: it keeps being removed by another process; "
                             "start the run again")
        self.own(file)
        return self

    def own(self, file):
        """Write our PID into the locked `file`, which is now ours."""
        file.seek(0)
        file.truncate()
        file.write(str(os.getpid()))
        file.flush()
        self.file = file

    def take_handed_lock(self):
        """Own the lock a parent handed us for this folder, if it did; the variable is used once."""
        descriptor = os.environ.get(self.HANDED_FD, "")
        if not descriptor.isdecimal():
            return False
        try:
            if os.fstat(int(descriptor)).st_ino != os.stat(self.path).st_ino:
                return False  # handed for another folder: this process takes its own locks
        except OSError:
            return False
        del os.environ[self.HANDED_FD]
        self.own(os.fdopen(int(descriptor), "a+"))
        return True

    def handed_fds(self):
        """The file descriptors a child must inherit to own this lock (`take_handed_lock`)."""
        return (self.file.fileno(),) if self.file is not None else ()

    def handed_env(self):
        return {self.HANDED_FD: str(self.file.fileno())} if self.file is not None else {}

    def hand_over(self):
        """Close our copy of the lock file without unlocking it: the child that inherited it holds
        the lock from now on, until it releases it or ends."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def release(self):
        if self.file is None:
            return
        try:
            with contextlib.suppress(OSError):  # a PID left behind only names us a moment longer
                self.file.truncate(0)  # so that a later reader does not name us as the next owner
                self.file.flush()
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        finally:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class FolderContents:
    """What a run folder holds: its log (or why it cannot be read) and its checkpoints."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.log, self.log_problem = None, None
        log_path = os.path.join(run_dir, LOG_NAME)
        if os.path.isfile(log_path):
            try:
                self.log = read_log(log_path)
            except LogError as error:
                self.log_problem = str(error)
        paths = checkpoint_paths(run_dir)
        self.last = paths["last"] if os.path.isfile(paths["last"]) else None
        self.best = paths["best"] if os.path.isfile(paths["best"]) else None

    @property
    def empty(self):
        return self.log is None and self.log_problem is None and self.last is None and self.best is None

    @property
    def finished(self):
        return self.log is not None and self.log.get("status") == "finished"

    @property
    def epochs_logged(self):
        return len(self.log["epochs"]) if self.log else 0

    def describe(self):
        if self.log is not None:
            return f"{self.epochs_logged} epoch(s) logged, status {self.log['status']}"
        if self.log_problem:
            return "a damaged log"
        return "a checkpoint"


def remove_if_unused(run_dir):
    """Delete a folder this process made for a run that never started (it holds only the lock)."""
    with contextlib.suppress(OSError):
        if os.listdir(run_dir) == [LOCK_NAME]:
            os.remove(os.path.join(run_dir, LOCK_NAME))
            os.rmdir(run_dir)


def remove_stale_temporaries(run_dir):
    """Delete the temporaries an interrupted `atomic_write` left (only the owner calls this)."""
    for path in glob.glob(os.path.join(glob.escape(run_dir), TEMPORARY_PREFIX + "*")):
        with contextlib.suppress(OSError):
            os.remove(path)


# Replacing a run is a transaction whose state is a file in `.replaced/`, written (atomically)
# before the moves it announces, so that whatever interrupts it, the next owner's `recover` knows
# which files are whose and finishes the step in progress instead of guessing from what is there.
STATE_NAME = ".state"
MOVING_ASIDE, ASIDE, PUTTING_BACK = "moving-aside", "aside", "putting-back"
DROPPED_SUFFIX = ".dropped"  # `.replaced` renamed so: being deleted, nothing in it is kept


def replaced_folder(run_dir):
    return os.path.join(run_dir, REPLACED_NAME)


def write_state(run_dir, state):
    atomic_write_bytes(os.path.join(replaced_folder(run_dir), STATE_NAME), state.encode("ascii"))


def read_state(run_dir):
    """The transaction's state, or None for a `.replaced/` of an older version that had none."""
    try:
        with open(os.path.join(replaced_folder(run_dir), STATE_NAME), encoding="ascii") as file:
            return file.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def move_aside(run_dir):
    """Move the run's files into `.replaced/` (the new run starts in an empty folder)."""
    os.makedirs(replaced_folder(run_dir), exist_ok=True)
    write_state(run_dir, MOVING_ASIDE)
    move_files(run_dir, replaced_folder(run_dir))
    write_state(run_dir, ASIDE)


def move_files(source, destination):
    """Move the run files that `source` holds into `destination`, replacing what is there."""
    for name in RUN_FILES:
        if os.path.exists(os.path.join(source, name)):
            os.replace(os.path.join(source, name), os.path.join(destination, name))


def put_back(run_dir):
    """Undo `move_aside` when the new run never wrote its log: every file moved aside returns."""
    if not os.path.isdir(replaced_folder(run_dir)):
        return
    write_state(run_dir, PUTTING_BACK)
    move_files(replaced_folder(run_dir), run_dir)
    drop_replaced(run_dir)


def drop_replaced(run_dir):
    """Delete the old run once the new one has a log of its own: renamed first, in one step, so
    that a deletion cut short leaves nothing that could be taken for a run to put back."""
    aside, dropped = replaced_folder(run_dir), replaced_folder(run_dir) + DROPPED_SUFFIX
    shutil.rmtree(dropped, ignore_errors=True)  # an earlier deletion cut short
    if os.path.isdir(aside):
        os.replace(aside, dropped)
    shutil.rmtree(dropped, ignore_errors=True)


def recover(run_dir):
    """Settle what an interrupted `--overwrite` left, from the state it recorded: moving aside or
    putting back is finished as putting back (the new run had no log yet); after the move, the new
    run is kept if it wrote its log, else the old one is put back."""
    shutil.rmtree(replaced_folder(run_dir) + DROPPED_SUFFIX, ignore_errors=True)
    if not os.path.isdir(replaced_folder(run_dir)):
        return
    state = read_state(run_dir)
    new_log = os.path.isfile(os.path.join(run_dir, LOG_NAME))
    if state in (MOVING_ASIDE, PUTTING_BACK) or not new_log:
        put_back(run_dir)
    else:  # ASIDE with the new run's log, or an older version's folder with a log: the new run
        drop_replaced(run_dir)
