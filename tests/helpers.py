"""What several test modules share: the tiny model sizes and the real-data locator."""
import os
import unittest

import torch

from gpt1_solution_template import MiniGPT1
from lstm_solution import LSTM
from utils.cli import shared_data_path

# One tiny configuration for the value tests: vocabulary 97, width 32, 4 heads, 16 positions.
TINY = {"vocabulary_size": 97, "embedding_size": 32, "hidden_size": 24, "num_heads": 4,
        "sequence_length": 16, "num_layers": 2}


def tiny_lstm(learn_embeddings=False, seed=0):
    torch.manual_seed(seed)
    return LSTM(TINY["vocabulary_size"], TINY["embedding_size"], TINY["hidden_size"],
                TINY["num_layers"], learn_embeddings)


def tiny_gpt(learn_embeddings=False, seed=0):
    torch.manual_seed(seed)
    return MiniGPT1(TINY["vocabulary_size"], TINY["embedding_size"], TINY["sequence_length"],
                    TINY["num_heads"], TINY["num_layers"], learn_embeddings)


def shared_data_dir(*parts):
    """`$SHARED_DATA_DIR/parts...` when it exists; otherwise the test is skipped with the reason."""
    root = shared_data_path()
    if not root:
        raise unittest.SkipTest("SHARED_DATA_DIR is not set (CI points it at ../shared/data)")
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        raise unittest.SkipTest(f"{path} does not exist")
    return path


def real_wikitext2_dir():
    folder = shared_data_dir("wikitext2")
    for split in ("train", "validation", "test"):
        if not os.path.isfile(os.path.join(folder, f"wiki.{split}.npz")):
            raise unittest.SkipTest(f"{folder} lacks wiki.{split}.npz")
    return folder
