"""The 12 experiments of the course as data: one frozen, self-validating config per run.

`EXPERIMENTS` maps "1".."12" to the assignment's presets; `resolve_config` applies command-line
overrides on top of a preset (or of `ExperimentConfig`'s defaults for a custom, non-numeric id).
"""
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

from utils.data_folder import EMBEDDINGS_FILE

MODELS = ("lstm", "gpt1")
OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("none", "cosine")
DEFAULT_EMBEDDINGS = "auto"  # DATA_FOLDER/embeddings.npz, GPT-1's pretrained weights
NO_EMBEDDINGS = "none"  # learn the embeddings from a random initialisation
MAX_EXP_ID_BYTES = 200  # a folder name; file systems allow 255 bytes


# The largest size or count a config takes: far above any run, and below what PyTorch's 64-bit
# arithmetic would overflow on (a batch of 1e20 failed as "Overflow when unpacking long long").
MAX_COUNT = 2 ** 31 - 1


def whole_number_in_range(value):
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_COUNT


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines a run's numbers. Names follow the course's flags."""

    exp_id: str = "custom"
    model: str = "lstm"
    layers: int = 1
    optimizer: str = "adam"
    batch_size: int = 16
    epochs: int = 10
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 42
    data_folder: str = "data"
    embeddings: str = DEFAULT_EMBEDDINGS
    # Model sizes; with pretrained embeddings, embedding_size and vocabulary come from the file.
    embedding_size: int = 768
    hidden_size: int = 512
    num_heads: int = 12
    sequence_length: int = 256
    dropout: float = 0.0  # LSTM: embeddings, between layers, last output; MiniGPT1: embeddings, attention, residuals
    # Options that change training only when asked for.
    scheduler: str = "none"
    clip_grad_norm: Optional[float] = None
    limit_batches: Optional[int] = None
    max_steps: Optional[int] = None
    precision: str = "auto"  # auto: bf16 on GPUs that have it, fp16 on older ones, fp32 elsewhere
    fused: bool = True  # the fused path (fused kernels, chunked loss); False: the reference path
    compile: bool = False

    def __post_init__(self):
        def fail(name, expected):
            raise ValueError(f"--{name}={getattr(self, name)!r} is invalid: expected {expected}")

        for name, choices in (("model", MODELS), ("optimizer", OPTIMIZERS),
                              ("precision", PRECISIONS), ("scheduler", SCHEDULERS)):
            if getattr(self, name) not in choices:
                fail(name, "one of " + ", ".join(choices))
        for name in ("layers", "batch_size", "epochs", "embedding_size", "hidden_size",
                     "num_heads", "sequence_length"):
            if not whole_number_in_range(getattr(self, name)):
                fail(name, f"a whole number in 1..{MAX_COUNT:,}")
        for name in ("limit_batches", "max_steps"):
            value = getattr(self, name)
            if value is not None and not whole_number_in_range(value):
                fail(name, f"a whole number in 1..{MAX_COUNT:,} (or leave it out)")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            fail("lr", "a finite number > 0")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            fail("momentum", "a number in [0, 1)")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            fail("dropout", "a probability in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            fail("weight_decay", "a finite number >= 0")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            fail("clip_grad_norm", "a finite number > 0 (or leave it out)")
        if self.model == "gpt1" and self.embedding_size % self.num_heads:
            fail("num_heads", f"a divisor of embedding_size={self.embedding_size}")
        exp_id = str(self.exp_id)
        if (not exp_id or not exp_id.isprintable() or any(c in exp_id for c in "/\\ ,")
                or exp_id in (".", "..") or len(exp_id.encode()) > MAX_EXP_ID_BYTES):
            fail("exp_id", f"a number 1..12 or a name of printable characters without '/', '\\', ',' or "
                           f"spaces, at most {MAX_EXP_ID_BYTES} bytes")

    @property
    def learn_embeddings(self):
        return self.embeddings == NO_EMBEDDINGS

    @property
    def embeddings_path(self):
        """The pretrained embeddings file, or None when the embeddings are learned."""
        if self.learn_embeddings:
            return None
        if self.embeddings == DEFAULT_EMBEDDINGS:
            return os.path.join(self.data_folder, EMBEDDINGS_FILE)
        return self.embeddings

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Rebuild a config from `to_dict()` output, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _preset(exp_id, model, layers, optimizer):
    return ExperimentConfig(exp_id=str(exp_id), model=model, layers=layers, optimizer=optimizer)


EXPERIMENTS = {
    config.exp_id: config for config in (
        _preset(1, "lstm", 1, "adam"),
        _preset(2, "lstm", 1, "adamw"),
        _preset(3, "lstm", 1, "sgd"),
        _preset(4, "lstm", 1, "momentum"),
        _preset(5, "gpt1", 1, "adam"),
        _preset(6, "gpt1", 1, "adamw"),
        _preset(7, "gpt1", 1, "sgd"),
        _preset(8, "gpt1", 1, "momentum"),
        _preset(9, "lstm", 2, "adamw"),
        _preset(10, "lstm", 4, "adamw"),
        _preset(11, "gpt1", 2, "adamw"),
        _preset(12, "gpt1", 4, "adamw"),
    )
}


def expand_exp_ids(text):
    """"all" -> "1".."12"; "1,2,5" -> ["1", "2", "5"]; a single id -> [id]. Numbers must be presets."""
    text = str(text).strip()
    ids = list(EXPERIMENTS) if text == "all" else [part.strip() for part in text.split(",")]
    if text != "all" and "all" in ids:
        raise ValueError(f"--exp_id {text!r} mixes 'all' into a list: use --exp_id all alone, or list "
                         "the ids, like 1,2,5")
    canonical = [exp_id.lstrip("0") if exp_id.isdigit() else exp_id for exp_id in ids]
    repeated = sorted({exp_id for exp_id in canonical if canonical.count(exp_id) > 1})
    if repeated:
        raise ValueError(f"--exp_id {text!r} names {', '.join(repeated)} more than once: list each id once")
    for exp_id in ids:
        if exp_id.isdigit() and exp_id.lstrip("0") not in EXPERIMENTS or not exp_id:
            raise ValueError(f"--exp_id {exp_id!r} is not an experiment: valid ids are 1..12, "
                             "'all', a list like 1,2,5, or a non-numeric name for a custom run")
    return [exp_id.lstrip("0") if exp_id.isdigit() else exp_id for exp_id in ids]


def resolve_config(exp_id, **overrides):
    """The config of `exp_id` (a preset number or a custom name) with `overrides` applied.

    Overrides whose value is None are ignored, so unset command-line flags keep the preset.
    """
    ids = expand_exp_ids(exp_id)
    if len(ids) != 1:
        raise ValueError(f"resolve_config takes one experiment id, not {exp_id!r}: "
                         "call it once per id of expand_exp_ids()")
    (exp_id,) = ids
    base = EXPERIMENTS.get(exp_id, ExperimentConfig(exp_id=exp_id))
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields are {sorted(known)}")
    return base.replace(**{key: value for key, value in overrides.items() if value is not None})
