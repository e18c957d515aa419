"""The one checkpoint format and its one loader, used by resume, generation, the report and the notebook.

A checkpoint is a dict saved with `torch.save` and read back with `weights_only=True`:

    {"format": "wikitext2-lm-checkpoint/1", "config": ExperimentConfig.to_dict(),
     "model_size": {"vocabulary_size", "embedding_size", "sequence_length"},
     "model": state_dict, "optimizer": state_dict or None, "scheduler": state_dict or None,
     "grad_scaler": GradScaler state_dict ({} without loss scaling) or None (absent in older
     files), "epoch": finished epochs, "steps": optimizer steps so far, "state": the loop's resumable
     bookkeeping (JSON-like), "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...]}}

Whole modules are never pickled: a model is rebuilt from the config and its state_dict loaded.
"""
import os
import pickle
import zipfile

import torch

from gpt1_solution_template import MiniGPT1
from lstm_solution import LSTM
from utils.config import ExperimentConfig
from utils.data_utils import atomic_write_bytes

CHECKPOINT_FORMAT = "wikitext2-lm-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not in this package's format."""


def build_model(config, vocabulary_size, embedding_size=None, sequence_length=None,
                tokens_weight=None, position_weight=None):
    """The model a config describes. Pretrained weights, when given, fix the embedding sizes.

    Embeddings learned from scratch start as GPT-1's did, N(0, 0.02^2) with a zero padding row,
    rather than nn.Embedding's N(0, 1): through the tied output layer, unit-variance rows give
    logits of standard deviation ~sqrt(embedding_size) and an initial loss far above ln V.
    """
    embedding_size = embedding_size or config.embedding_size
    sequence_length = sequence_length or config.sequence_length
    if config.model == "lstm":
        model = LSTM(vocabulary_size, embedding_size, config.hidden_size, config.layers,
                     config.learn_embeddings, _embedding_weight=tokens_weight)
    else:
        model = MiniGPT1(vocabulary_size, embedding_size, sequence_length, config.num_heads,
                         config.layers, config.learn_embeddings, _tokens_embedding_weight=tokens_weight,
                         _positional_embedding_weight=position_weight)
    if tokens_weight is None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.startswith("embedding"):
                    parameter.normal_(0.0, 0.02)
            model.output_weight[0].zero_()
    return model


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


def unwrap(model):
    """The plain module inside DistributedDataParallel or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, config, model, optimizer=None, scheduler=None, epoch=0, steps=0, state=None,
                    grad_scaler=None):
    """Atomically write a checkpoint of the run to `path`."""
    import io

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


def load_checkpoint(path, device="cpu"):
    """Rebuild the model of a checkpoint: returns `(model, config, payload)`, model in eval mode."""
    payload = read_checkpoint(path)
    config = ExperimentConfig.from_dict(payload["config"])
    model = build_model(config, **payload["model_size"])
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit the model its config describes: "
                              f"{str(error).splitlines()[0]}") from None
    return model.to(device).eval(), config, payload
