"""The zip to upload to Gradescope as the assignment's autograder.

At its root: `setup.sh` (CPU torch from PyTorch's index, then requirements.txt), `run_autograder`
(grades `$ROOT/submission` into `$ROOT/results/results.json` with `python -m utils.grade`, the
local command; ROOT is `$AUTOGRADER_ROOT`, else a first argument, else Gradescope's /autograder),
`requirements.txt`, the reference model files and `utils/`. Gradescope unpacks it into
`/autograder/source` and runs `setup.sh` once when the image is built.
"""
import os
import zipfile

from utils.cli import UsageError
from utils.files import atomic_write
from utils.grading.session import PACKAGE_ROOT

MODEL_FILES = ("lstm_solution.py", "gpt1_solution_template.py", "gpt1_solution.py", "requirements.txt")

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, from /autograder/source, when it builds the autograder's image.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v pip3 >/dev/null; then
    apt-get update && apt-get install -y python3 python3-pip
fi
# Ubuntu 24.04's Python refuses system-wide installs (PEP 668); the image is this grader's alone.
export PIP_BREAK_SYSTEM_PACKAGES=1
# The CPU build first: the range in requirements.txt then keeps it (no CUDA wheels to download).
pip3 install torch --index-url https://download.pytorch.org/whl/cpu
pip3 install -r requirements.txt
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for each submission: the student's files are in $ROOT/submission and
# Gradescope reads $ROOT/results/results.json. ROOT: $AUTOGRADER_ROOT, else $1, else /autograder.
set -uo pipefail
ROOT="${AUTOGRADER_ROOT:-${1:-/autograder}}"
mkdir -p "$ROOT/results"
cd "$ROOT/source"
# results/ is Gradescope's own output folder: a run again replaces the last results.
python3 -m utils.grade "$ROOT/submission" --json "$ROOT/results/results.json" --overwrite
"""


def package_files():
    """(path in the zip, path here) of the package's files the grader needs."""
    files = [(name, os.path.join(PACKAGE_ROOT, name)) for name in MODEL_FILES]
    for folder, subfolders, names in os.walk(os.path.join(PACKAGE_ROOT, "utils")):
        subfolders[:] = sorted(name for name in subfolders if name != "__pycache__")
        for name in sorted(names):
            if not name.endswith((".pyc", ".pyo")):
                path = os.path.join(folder, name)
                files.append((os.path.relpath(path, PACKAGE_ROOT), path))
    return files


def build_zip(path, overwrite=False):
    """Write the autograder zip to `path` (atomically); the names it holds. UsageError if `path`
    exists and `overwrite` is False."""
    if os.path.isdir(path):
        raise UsageError(f"--autograder {path!r} is a folder: name the zip file to write")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"--autograder {path!r} exists: pass --overwrite to replace it, or choose another name")
    names = []
    with atomic_write(path) as file, zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in (("setup.sh", SETUP), ("run_autograder", RUN_AUTOGRADER)):
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = 0o100755 << 16  # executable once unpacked
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, text)
            names.append(name)
        for name, source in package_files():
            archive.write(source, name)
            names.append(name)
    return names
