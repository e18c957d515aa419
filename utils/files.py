"""Files written whole or not at all, and JSON that strict readers accept.

Every file the package writes for later (logs, checkpoints, data arrays, kept tensor rows, the
benchmark's JSON) goes through `atomic_write`: a temporary file beside the target, flushed to disk,
then renamed over it, so that a crash or a signal leaves the old file or the new one.
"""
import contextlib
import json
import math
import os
import tempfile

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
