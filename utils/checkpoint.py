"""The one checkpoint format: its writer and its reader (`utils.models.load_checkpoint` rebuilds the model).

A checkpoint is a dict saved with `torch.save` and read back with `weights_only=True` (its keys:
docs/FORMATS.md). It ends with one line holding the sha256 of the bytes before it, so that a
damaged file is refused rather than trained on; files written before the digest existed still
load, with a warning. Whole modules are never pickled: a model is rebuilt from the config and its
state_dict loaded.
"""
import hashlib
import io
import os
import pickle
import warnings
import zipfile

import torch

from utils.files import atomic_write_bytes
from utils.torch_utils import unwrap

CHECKPOINT_FORMAT = "wikitext2-lm-checkpoint/1"
DIGEST_PREFIX = b"\nwikitext2-lm-sha256:"
DIGEST_LINE_BYTES = len(DIGEST_PREFIX) + 64 + 1  # prefix, 64 hex digits, "\n"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not in this package's format."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose bytes no longer match the digest written with them."""


def model_size(model):
    """The sizes needed to rebuild `model` (they may come from an embeddings file, not the config)."""
    return {"vocabulary_size": model.vocabulary_size, "embedding_size": model.embedding_size,
            "sequence_length": getattr(model, "sequence_length", None)}


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, config, model, optimizer=None, scheduler=None, epoch=0, steps=0, state=None,
                    grad_scaler=None):
    """Atomically write a checkpoint of the run to `path`."""
    model = unwrap(model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "model_size": model_size(model),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        # Loss scaling's state ({} when scaling is off): a resumed run scales as it would have.
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "epoch": epoch,
        "steps": steps,
        "state": state or {},
        "rng": rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()
    atomic_write_bytes(path, data + DIGEST_PREFIX + digest + b"\n")


def verify_checkpoint(path):
    """True when `path` carries a digest that matches its bytes, False when it has none (older files).

    Raises DamagedCheckpointError when the digest does not match, and OSError when unreadable.
    """
    with open(path, "rb") as file:
        return verify_open_checkpoint(file, path)


def verify_open_checkpoint(file, path):
    """`verify_checkpoint` of an open file: the bytes verified are those the same file then loads,
    even if a newer checkpoint replaces `path` meanwhile."""
    size = os.fstat(file.fileno()).st_size
    if size < DIGEST_LINE_BYTES:
        return False
    file.seek(size - DIGEST_LINE_BYTES)
    line = file.read()
    if not line.startswith(DIGEST_PREFIX):
        return False
    expected = line[len(DIGEST_PREFIX):-1].decode("ascii", "replace")
    digest = hashlib.sha256()
    file.seek(0)
    remaining = size - DIGEST_LINE_BYTES
    while remaining:
        block = file.read(min(remaining, 1 << 22))
        if not block:
            break
        digest.update(block)
        remaining -= len(block)
    if digest.hexdigest() != expected:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: its bytes do not match the sha256 "
                                     "written with them")
    return True


def load_payload(file, path, map_location):
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, AttributeError, KeyError, IndexError, TypeError) as error:  # damaged bytes
        raise CheckpointError(f"checkpoint {path} is not readable ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); "
                              "it may be truncated: use the other checkpoint of the run or train again") from None


def read_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict safely (`weights_only=True`); raises CheckpointError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (train one with `python run_exp.py`, "
                              "which writes LOG_DIR/EXP_ID/best.pt and last.pt)")
    try:
        with open(path, "rb") as file:
            verified = verify_open_checkpoint(file, path)
            file.seek(0)
            payload = load_payload(file, path, map_location)
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} is not readable ({error.strerror})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not in this package's format "
                              f"({CHECKPOINT_FORMAT})")
    if not verified:  # said only of a file that loads: a truncated one has lost its digest too
        warnings.warn(f"checkpoint {path} has no digest (written before they existed): "
                      "loaded unverified", stacklevel=2)
    return payload
