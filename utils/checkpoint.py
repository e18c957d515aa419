"""The one checkpoint format: its writer and its reader (`utils.models.load_checkpoint` rebuilds the model).

A checkpoint is a dict saved with `torch.save` and read back with `weights_only=True`:

    {"format": "wikitext2-lm-checkpoint/1", "config": ExperimentConfig.to_dict(),
     "model_size": {"vocabulary_size", "embedding_size", "sequence_length"},
     "model": state_dict, "optimizer": state_dict or None, "scheduler": state_dict or None,
     "grad_scaler": GradScaler state_dict ({} without loss scaling) or None (absent in older
     files), "epoch": finished epochs, "steps": optimizer steps so far, "state": the loop's resumable
     bookkeeping (JSON-like), "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...]}}

Whole modules are never pickled: a model is rebuilt from the config and its state_dict loaded.
"""
import io
import os
import pickle
import zipfile

import torch

from utils.data_utils import atomic_write_bytes
from utils.torch_utils import unwrap

CHECKPOINT_FORMAT = "wikitext2-lm-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not in this package's format."""


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
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict safely (`weights_only=True`); raises CheckpointError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (train one with `python run_exp.py`, "
                              "which writes LOG_DIR/EXP_ID/best.pt and last.pt)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {path} is not readable ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); "
                              "it may be truncated: use the other checkpoint of the run or train again") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not in this package's format "
                              f"({CHECKPOINT_FORMAT})")
    return payload
