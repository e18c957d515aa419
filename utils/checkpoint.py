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
    write_payload(path, payload)


def write_payload(path, payload):
    """Atomically write a checkpoint dict to `path`, followed by the sha256 line of its bytes."""
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


def whole_number(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# What each field of the format must be; a file that a digest vouches for can still have been
# written by other code, and a wrong type would surface far away, as a traceback.
PAYLOAD_FIELDS = {
    "config": (lambda value: isinstance(value, dict), "an object"),
    "model_size": (lambda value: isinstance(value, dict) and all(
        whole_number(value.get(key)) for key in ("vocabulary_size", "embedding_size"))
        and (value.get("sequence_length") is None or whole_number(value["sequence_length"])),
        "an object of whole numbers vocabulary_size, embedding_size, sequence_length"),
    "model": (lambda value: isinstance(value, dict) and all(isinstance(t, torch.Tensor) for t in value.values()),
              "a state_dict of tensors"),
    "epoch": (whole_number, "a whole number"),
    "steps": (whole_number, "a whole number"),
    "state": (lambda value: isinstance(value, dict) and isinstance(value.get("epochs", []), list)
              and all(isinstance(entry, dict) for entry in value.get("epochs", []))
              and (value.get("best") is None or isinstance(value["best"], dict)),
              "an object with a list 'epochs' of objects and 'best' an object or null"),
    "rng": (lambda value: isinstance(value, dict) and isinstance(value.get("torch"), torch.Tensor),
            "an object holding the 'torch' generator state"),
}


def check_payload(payload, path):
    """Raise CheckpointError naming the first field of `payload` that is missing or of a wrong type."""
    for name, (valid, expected) in PAYLOAD_FIELDS.items():
        if name not in payload:
            raise CheckpointError(f"checkpoint {path} lacks its '{name}': it was not written by this "
                                  "package; use the run's other checkpoint or train again")
        if not valid(payload[name]):
            raise CheckpointError(f"checkpoint {path}: '{name}' is not {expected}; use the run's "
                                  "other checkpoint or train again")


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
    check_payload(payload, path)
    if not verified:  # said only of a file that loads: a truncated one has lost its digest too
        warnings.warn(f"checkpoint {path} has no digest (written before they existed): "
                      "loaded unverified", stacklevel=2)
    return payload
