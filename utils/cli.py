"""What every command line of the package shares: `run_exp.py` and the `python -m utils.*` tools.

- `OneLineParser`: a bad flag is one line on stderr and exit code 2; `--help` shows each default
  once (`DefaultsOnceFormatter`).
- `positive_int`, `nonnegative_int`, `positive_float`: argparse types that name the bad value.
- `resolve_device`: "cpu" / "cuda" / "cuda:N" / None (CUDA when present) -> a usable device.
- `environment_record`: the software and device a measurement was made with.
- `shared_data_path`: the developers' data folder, `$SHARED_DATA_DIR`, used by tests and tools.
"""
import argparse
import os
import platform
import sys
import warnings

SHARED_DATA_ENV = "SHARED_DATA_DIR"


class UsageError(Exception):
    """Bad input the user can fix: a command line prints it as one line and exits with code 2."""


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help, unless the help already names its default or it has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        flag = action.nargs == 0  # store_true / store_false / help: the default says nothing
        if "default" in text or flag or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2, as every error here."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsOnceFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(text, kind, minimum, inclusive, expected):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
    if value != value or value in (float("inf"), float("-inf")) or (
            value < minimum if inclusive else value <= minimum):
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
    return value


def positive_int(text):
    """argparse type: a whole number >= 1."""
    return _number(text, int, 1, True, "a whole number >= 1")


def nonnegative_int(text):
    """argparse type: a whole number >= 0."""
    return _number(text, int, 0, True, "a whole number >= 0")


def positive_float(text):
    """argparse type: a finite number > 0."""
    return _number(text, float, 0.0, False, "a finite number > 0")


def resolve_device(name=None):
    """The torch device named `name` ("cpu", "cuda", "cuda:N"; None: CUDA when present, else CPU).

    "cuda" becomes the current device by index and is made current, as `torch.cuda.set_device`
    needs. Raises UsageError naming the value when it is not a device or asks for a missing GPU.
    """
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r} is not supported: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for CUDA but none is available: use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name} names GPU {device.index} but this machine has "
                             f"{torch.cuda.device_count()}: use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(device)
    return device


def cpuinfo_value(key):
    """The value of the first `key : value` line of /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_name():
    """The processor's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    return cpuinfo_value("model name") or platform.processor() or "cpu"


def environment_record(device):
    """The software and hardware behind a measurement: versions, platform and the device's name."""
    import numpy as np
    import torch

    cuda = device.type == "cuda"
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None}


def shared_data_path(*parts):
    """`$SHARED_DATA_DIR/parts...` (the developers' copy of the data), or None when it is unset."""
    root = os.environ.get(SHARED_DATA_ENV)
    return os.path.join(root, *parts) if root else None


def fail(prog, error, code=None):
    """Print `error` as the one line a command ends with, and return the exit code to use.

    The code is the error's own `exit_code` when it has one, else 2 (input the user can fix).
    """
    print(f"{prog}: error: {error}", file=sys.stderr)
    return code if code is not None else getattr(error, "exit_code", 2)


def one_line_warnings():
    """Show Python warnings as one `warning: ...` line on stderr, as the rest of the output."""
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
