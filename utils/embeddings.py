"""GPT-1's input embeddings (token + learned position) and the reader of `embeddings.npz`.

`embeddings.npz` (made by `python -m utils.prepare_data`) holds `tokens` `(V, C)` float32, row 0
the padding row, and `position` `(L, C)` float32: GPT-1's pretrained weights.
"""
import os

import numpy as np
import torch
from torch import nn

from utils.wikitext2 import read_npz_arrays


def load_embedding_arrays(filename, keys=("tokens", "position")):
    """Read the named 2-D float arrays of an embeddings `.npz` as float32 tensors.

    Raises FileNotFoundError (naming the file and how to make it) when it is missing, and
    ValueError naming the file when it is not an npz, lacks a key or holds an array that is not
    2-D with the same width as the others.
    """
    filename = os.fspath(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(
            f"embeddings file not found: {filename} (make it with `python -m utils.prepare_data`, "
            "or train without it with `--embeddings none`)")
    what = f"embeddings file {filename}"
    remedy = "make it again with `python -m utils.prepare_data --force`, or train with `--embeddings none`"
    arrays = read_npz_arrays(filename, keys, what, remedy)
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise ValueError(f"{what} lacks the array(s) {missing}; {remedy}")
    try:
        arrays = {key: np.asarray(array, dtype=np.float32) for key, array in arrays.items()}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} holds arrays that are not numbers ({error}); {remedy}") from None
    widths = {key: array.shape[1] if array.ndim == 2 else None for key, array in arrays.items()}
    if None in widths.values() or len(set(widths.values())) != 1:
        shapes = {key: array.shape for key, array in arrays.items()}
        raise ValueError(f"embeddings file {filename} holds arrays of shapes {shapes}; "
                         "expected 2-D arrays of the same width")
    return {key: torch.from_numpy(array) for key, array in arrays.items()}


def check_index_range(indices, limit, what):
    """Raise ValueError naming the first offending value when `indices` leave `[0, limit)`."""
    if indices.numel() == 0:
        return
    low, high = torch.aminmax(indices)
    low, high = int(low), int(high)
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise ValueError(f"{what} {bad} is out of range: valid {what}s are 0..{limit - 1}")


class GPT1Embedding(nn.Module):
    """Token embedding plus learned position embedding.

    Attributes `tokens` (`nn.Embedding(vocabulary_size, embedding_size, padding_idx=0)`) and
    `position` (`nn.Embedding(sequence_length, embedding_size)`).
    """

    def __init__(self, vocabulary_size, embedding_size, sequence_length,
                 _tokens_embedding_weight=None, _positional_embedding_weight=None):
        super().__init__()
        self.vocabulary_size = vocabulary_size
        self.embedding_size = embedding_size
        self.sequence_length = sequence_length
        self.tokens = nn.Embedding(vocabulary_size, embedding_size, padding_idx=0,
                                   _weight=_tokens_embedding_weight)
        self.position = nn.Embedding(sequence_length, embedding_size,
                                     _weight=_positional_embedding_weight)

    def forward(self, tokens, positions):
        """`tokens` `(B, T)` and `positions` `(B, T)` or `(T,)` LongTensors -> `(B, T, C)`.

        An id or position out of range raises ValueError for tensors on the CPU. On a GPU the
        check is left out: reading the range back would make the host wait for the GPU at every
        step (the data's ids are checked when Wikitext2 loads them).
        """
        if tokens.device.type == "cpu":
            check_index_range(tokens, self.vocabulary_size, "token id")
            check_index_range(positions, self.sequence_length, "position")
        return self.tokens(tokens) + self.position(positions)  # (B, T, C)

    @classmethod
    def load_embeddings_from(cls, filename):
        """Build the module from `tokens` `(V, C)` and `position` `(L, C)` of an `.npz` file."""
        arrays = load_embedding_arrays(filename)
        tokens, position = arrays["tokens"], arrays["position"]
        return cls(tokens.shape[0], tokens.shape[1], position.shape[0],
                   _tokens_embedding_weight=tokens, _positional_embedding_weight=position)
