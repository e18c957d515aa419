"""What a data folder (`--data_folder`) holds; `utils/prepare_data.py` makes it (see data/README.md).

    wiki.{train,validation,test}.npz   the three splits (utils/wikitext2.py reads them)
    embeddings.npz                     GPT-1's embeddings (utils/embeddings.py reads them)
    vocab.json, merges.txt             the GPT-1 tokenizer (utils/tokenization.py)

Nothing here imports torch, so that `python -m utils.prepare_data` starts without it.
"""
import os

SPLITS = ("train", "validation", "test")
EMBEDDINGS_FILE = "embeddings.npz"


def split_file(split):
    """The name of a split's file: `wiki.{split}.npz`."""
    return f"wiki.{split}.npz"


DATA_FILES = tuple(split_file(split) for split in SPLITS)


def split_path(folder, split):
    return os.path.join(os.fspath(folder), split_file(split))
