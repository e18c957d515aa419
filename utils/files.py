"""Files written whole or not at all, folders that can be written, and JSON strict readers accept.

Every file the package writes for later (logs, checkpoints, data arrays, kept tensor rows, the
benchmark's JSON) goes through `atomic_write`: a temporary file beside the target, flushed to disk,
then renamed over it, so that a crash or a signal leaves the old file or the new one. A folder
that cannot be written is one line naming it and the setting to change.
"""
import contextlib
import errno
import json
import math
import os
import tempfile

from utils.cli import UsageError

TEMPORARY_PREFIX = ".tmp-"  # what an interrupted write leaves (utils/run_folder.py removes them)


def current_umask():
    """The process's umask: from /proc where Linux gives it, else by setting it and back at once
    (which another thread could observe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path):
    """A binary file to write `path` through: renamed over `path` once the block ends.

    The folder is made if needed. If the block fails (a signal included) the temporary file is
    removed and `path` is left as it was; an OSError always names the file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp's 0600 would ignore the user's umask
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError) and error.filename is None:  # a failed write() names no file
            raise OSError(error.errno, error.strerror, path) from error
        raise


def atomic_write_bytes(path, data):
    """Write `data` to `path` through `atomic_write`."""
    with atomic_write(path) as file:
        file.write(data)


class StorageError(OSError):
    """A folder cannot be written (permission, full disk...); the message says which and what to do."""


def storage_error(error, path, setting="--data_folder"):
    """A StorageError saying what went wrong writing `path` and which `setting` to change."""
    folder = os.path.dirname(os.path.abspath(path))
    if error.errno == errno.ENOSPC:
        return StorageError(f"disk full while writing {path}: free some space in {folder} "
                            f"or pick another {setting}, then run again to resume")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path}: {error.strerror.lower()}; "
                            f"pick a writable {setting}")
    return StorageError(f"cannot write {path}: {(error.strerror or str(error)).lower()}; "
                        f"pick another {setting}")


def describe_os_error(error):
    """`strerror` of an OSError in a few words, with a hint for the names the file system refuses."""
    if error.errno == errno.ENAMETOOLONG:
        return "a name longer than the file system allows: choose a shorter --exp_id"
    return error.strerror or type(error).__name__


def check_writable_folder(folder, flag):
    """Create `folder` if needed and make sure files can be written in it; UsageError in one line
    naming `flag`, the setting to change."""
    if not os.fspath(folder):
        raise UsageError(f"{flag} is empty: name a folder")
    try:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"{folder} is a file, not a folder: choose another {flag}")
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb") as file:
            file.write(b"0")
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"cannot write in {folder} ({describe_os_error(error)}): "
                         f"choose another {flag} or free the disk") from None


def json_ready(value):
    """`value` with every non-finite float made None: JSON has no NaN or Infinity, and a diverged
    run's figures are written as null rather than as a file strict readers refuse."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value):
    """`value` as indented JSON text ending in a newline, non-finite numbers as null."""
    return json.dumps(json_ready(value), indent=2, allow_nan=False) + "\n"


def write_json(path, value):
    """Atomically write `value` to `path` as `json_text`."""
    atomic_write_bytes(path, json_text(value).encode("utf-8"))
