"""What several test modules share: the tiny model sizes, a tiny data folder and the real-data locator."""
import os
import unittest

import numpy as np
import torch

from gpt1_solution_template import MiniGPT1
from lstm_solution import LSTM
from utils.cli import shared_data_path
from utils.data_folder import SPLITS, split_file, split_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    for split in SPLITS:
        if not os.path.isfile(split_path(folder, split)):
            raise unittest.SkipTest(f"{folder} lacks {split_file(split)}")
    return folder


def write_tiny_data(folder, vocabulary_size=50, width=16, positions=16, seed=0):
    """Three splits of a learnable stream (each id fixes the next) and an embeddings npz."""
    generator = np.random.default_rng(seed)
    for split, length in (("train", 600), ("validation", 120), ("test", 120)):
        stream = [int(generator.integers(1, vocabulary_size))]
        while len(stream) < length:
            stream.append((7 * stream[-1] + 3) % (vocabulary_size - 1) + 1)
        sizes, left = [], length
        while left:
            sizes.append(min(left, int(generator.integers(1, 30))))
            left -= sizes[-1]
        np.savez(os.path.join(folder, f"wiki.{split}.npz"), tokens=np.array(stream, np.uint16),
                 sizes=np.array(sizes, np.int64))
    path = os.path.join(folder, "embeddings.npz")
    np.savez(path, tokens=generator.normal(size=(vocabulary_size, width)).astype(np.float32),
             position=generator.normal(size=(positions, width)).astype(np.float32))
    return path


def skip_unless_cpu_autocast(precision, *models):
    """Skip a test where this CPU cannot run `models` under `precision` autocast, with the probe's
    reason (utils/cpu_autocast.py): CPUs differ, and the test follows the machine it runs on."""
    from utils.cpu_autocast import cpu_autocast_refusal

    refusals = [cpu_autocast_refusal(precision, model) for model in models]
    refusal = next((reason for reason in refusals if reason), None)
    return unittest.skipIf(refusal is not None, refusal or "")
