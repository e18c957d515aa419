"""The one place that builds models: from a config, from pretrained embeddings, from a checkpoint.

Used by the training loop, generation, the benchmark and the notebook; the course's own
`load_embeddings_from` classmethods stay on the model classes for the course's scripts.
"""
import torch

from gpt1_solution import MiniGPT1  # the course's name: the starter has no gpt1_solution_template.py
from lstm_solution import LSTM
from utils.checkpoint import CheckpointError, read_checkpoint
from utils.cli import UsageError
from utils.config import ExperimentConfig
from utils.embeddings import load_embedding_arrays
from utils.wikitext2 import GPT1_VOCABULARY_SIZE


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
                     config.learn_embeddings, _embedding_weight=tokens_weight, dropout=config.dropout)
    else:
        model = MiniGPT1(vocabulary_size, embedding_size, sequence_length, config.num_heads,
                         config.layers, config.learn_embeddings, _tokens_embedding_weight=tokens_weight,
                         _positional_embedding_weight=position_weight, dropout=config.dropout)
    if tokens_weight is None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.startswith("embedding"):
                    parameter.normal_(0.0, 0.02)
            model.output_weight[0].zero_()
    return model


def model_for_config(config):
    """The model of `config`: on the pretrained embeddings file, or learned ones (`--embeddings none`).

    Raises UsageError when the file's sizes cannot serve the config, FileNotFoundError /
    ValueError (naming the file) when it is missing or unreadable.
    """
    if config.learn_embeddings:
        return build_model(config, GPT1_VOCABULARY_SIZE)
    keys = ("tokens",) if config.model == "lstm" else ("tokens", "position")
    arrays = load_embedding_arrays(config.embeddings_path, keys=keys)
    tokens, position = arrays["tokens"], arrays.get("position")
    if position is not None:
        if position.shape[0] < config.sequence_length:
            raise UsageError(f"embeddings file {config.embeddings_path} has {position.shape[0]} positions, "
                             f"fewer than sequence_length={config.sequence_length}")
        position = position[:config.sequence_length]
    if config.model == "gpt1" and tokens.shape[1] % config.num_heads:
        raise UsageError(f"--num_heads={config.num_heads} does not divide the embeddings' width "
                         f"{tokens.shape[1]}")
    return build_model(config, tokens.shape[0], tokens.shape[1], config.sequence_length,
                       tokens_weight=tokens, position_weight=position)


def count_parameters(model):
    """`{"total", "learnable"}`; tied weights are one Parameter, counted once."""
    parameters = list(model.parameters())
    return {"total": sum(p.numel() for p in parameters),
            "learnable": sum(p.numel() for p in parameters if p.requires_grad)}


def load_checkpoint(path, device="cpu"):
    """Rebuild the model of a checkpoint: returns `(model, config, payload)`, model in eval mode."""
    payload = read_checkpoint(path)
    try:
        config = ExperimentConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} holds a config this package cannot use ({error})") from None
    check_fits(payload, config, path)
    model = build_model(config, **payload["model_size"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), config, payload


def check_fits(payload, config, path):
    """Raise CheckpointError unless the stored weights have the shapes of the model `config` and
    the stored sizes describe. The model is laid out on the meta device, which allocates nothing,
    so sizes that no memory could hold are refused rather than tried."""
    sizes = payload["model_size"]
    with torch.device("meta"):
        expected = {key: tuple(value.shape)
                    for key, value in build_model(config, **sizes).state_dict().items()}
    stored = {key: tuple(value.shape) for key, value in payload["model"].items()}
    if stored != expected:
        differing = sorted(set(stored) ^ set(expected)) or sorted(
            key for key in stored if stored[key] != expected[key])
        key = differing[0]
        raise CheckpointError(f"checkpoint {path} does not fit the model its config and sizes "
                              f"{sizes} describe: {key} is {stored.get(key, 'missing')}, the model's "
                              f"{expected.get(key, 'missing')}")
