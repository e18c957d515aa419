# BEGIN SOLUTION NO PROMPT
# `# BEGIN SOLUTION` / `# END SOLUTION` mark the graded answers, which `python -m utils.starter` turns
# into TODOs; `# BEGIN SOLUTION NO PROMPT` marks solution-only code the starter drops (docs/STARTER.md).
# END SOLUTION
"""MiniGPT1: a small GPT-1 (Radford et al., 2018) of the course (IFT6135 assignment 2).

Legend: B batch, T time, C channels (embedding size), H heads, D head size (C = H * D),
V vocabulary, L maximum sequence length.

    ids (B, T) -> token + position embedding (B, T, C) -> num_layers post-norm Blocks (B, T, C)
               -> Linear C->V (the token embedding matrix itself) -> log_softmax (B, T, V)

A Block is GPT-1's post-norm block: a = norm1(x + attention(x)); out = norm2(a + mlp(a)).
The embeddings, and with them the tied output weight, are frozen unless `learn_embeddings=True`.

With `dropout = p > 0` units are dropped, in train mode only, where GPT-1 drops them: the summed
embeddings (B, T, C), the attention weights (B, H, T, T), and each residual branch (attention's
output projection and the MLP's output, (B, T, C)) before it is added back. Layer norms are not.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.embeddings import GPT1Embedding, load_embedding_arrays
from utils.language_model import LanguageModel


def check_length(length, sequence_length):
    """Refuse, naming both, a sequence longer than the positions the model has."""
    if length > sequence_length:
        raise ValueError(f"sequence of length {length} is longer than sequence_length="
                         f"{sequence_length}; cut the input to at most that many tokens")


# BEGIN SOLUTION NO PROMPT
class LayerNormFunction(torch.autograd.Function):
    """Layer normalisation over the last dimension, with its backward pass derived by hand.

    `inputs` `(*, C)`, `weight` `(C,)`, `bias` `(C,)` -> `(*, C)`. Forward, with the biased
    variance: x^ = (x - mean(x)) * r, r = 1 / sqrt(var(x) + eps), y = x^ * weight + bias. Backward,
    for g = dL/dy and g^ = g * weight (means over the last dimension):

        dL/dx = r * (g^ - mean(g^) - x^ * mean(g^ * x^)),  dL/dweight = sum(g * x^),  dL/dbias = sum(g)

    It computes what `LayerNorm.explicit` does in fewer operations than autograd through that
    formula, which matters on a GPU where a transformer layer's time goes mostly on launching small
    kernels. The backward is written in differentiable operations of `inputs`: when a graph of the
    gradient is built (`create_graph=True`, a gradient penalty), the statistics are recomputed from
    `inputs` under autograd, so second derivatives are exact; otherwise the forward's are reused.
    """

    @staticmethod
    def forward(ctx, inputs, weight, bias, eps):
        variance, mean = torch.var_mean(inputs, dim=-1, correction=0, keepdim=True)  # (*, 1) each
        inverse_std = torch.rsqrt(variance + eps)  # (*, 1)
        normalised = (inputs - mean) * inverse_std  # (*, C)
        # The input, not x^: the same memory, and what a differentiable backward needs.
        ctx.save_for_backward(inputs, weight, mean, inverse_std)
        ctx.eps = eps
        return torch.addcmul(bias, normalised, weight)  # (*, C)

    @staticmethod
    def backward(ctx, grad):
        inputs, weight, mean, inverse_std = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the statistics as functions of the input
            variance, mean = torch.var_mean(inputs, dim=-1, correction=0, keepdim=True)  # (*, 1) each
            inverse_std = torch.rsqrt(variance + ctx.eps)  # (*, 1)
        normalised = (inputs - mean) * inverse_std  # (*, C): x^
        width = normalised.shape[-1]
        grad_times_normalised = grad * normalised  # (*, C)
        grad_weight = grad_times_normalised.reshape(-1, width).sum(0)  # (C,)
        grad_bias = grad.reshape(-1, width).sum(0)  # (C,)
        grad_normalised = grad * weight  # (*, C): g^
        projection = (grad_times_normalised * weight).mean(dim=-1, keepdim=True)  # (*, 1): mean(g^ x^)
        centred = grad_normalised - grad_normalised.mean(dim=-1, keepdim=True)  # (*, C)
        grad_inputs = torch.addcmul(centred, normalised, projection, value=-1) * inverse_std  # (*, C)
        return grad_inputs, grad_weight, grad_bias, None
# END SOLUTION


class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension, written out (biased variance, as nn.LayerNorm)."""

    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        # BEGIN SOLUTION NO PROMPT
        # True: `forward` uses `LayerNormFunction`, the same formula with a hand-derived backward
        # pass; False differentiates the written-out formula through autograd (the reference path).
        self.fused = True
        # END SOLUTION
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def forward(self, inputs):
        """`inputs` `(*, hidden_size)` -> same shape, each last-dimension vector normalised."""
        # BEGIN SOLUTION NO PROMPT
        if self.fused:
            return LayerNormFunction.apply(inputs, self.weight, self.bias, self.eps)
        # END SOLUTION
        # BEGIN SOLUTION
        variance, mean = torch.var_mean(inputs, dim=-1, correction=0, keepdim=True)  # (*, 1) each, biased
        normalised = (inputs - mean) * torch.rsqrt(variance + self.eps)  # (*, hidden_size)
        return normalised * self.weight + self.bias
        # END SOLUTION

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


class MultiHeadedAttention(nn.Module):
    """Causal multi-headed self-attention with affine Q, K, V and output maps.

    `dropout` (keyword-only, default 0): in train mode, the probability of zeroing an attention
    weight (after `get_attention_weights`, which stays the plain softmax) and a unit of the output
    projection (the residual branch).
    """

    def __init__(self, head_size, num_heads, sequence_length, *, dropout=0.0):
        super().__init__()
        self.head_size = head_size
        self.num_heads = num_heads
        self.sequence_length = sequence_length
        self.attention_dropout = nn.Dropout(dropout)
        self.residual_dropout = nn.Dropout(dropout)

        # BEGIN SOLUTION NO PROMPT
        # True: `forward` is `fused_forward`; False: the course's path (the benchmark's reference).
        self.fused = True
        # END SOLUTION
        # BEGIN SOLUTION
        width = num_heads * head_size
        self.queries = nn.Linear(width, width)
        self.keys = nn.Linear(width, width)
        self.values = nn.Linear(width, width)
        self.output = nn.Linear(width, width)
        # s in the course's formula; a buffer so it follows .to(device), not saved in state_dicts.
        causal = torch.tril(torch.ones(sequence_length, sequence_length))
        self.register_buffer("causal_mask", causal, persistent=False)
        # END SOLUTION

    def get_attention_weights(self, queries, keys):
        """Causal attention weights.

        `queries`, `keys` `(B, H, T, head_size)` -> `(B, H, T, T)`: softmax over the last
        dimension of x~ = x * s - 1e4 * (1 - s), x = Q K^T / sqrt(head_size), s lower-triangular.
        """
        # BEGIN SOLUTION
        length = queries.shape[-2]
        scores = queries @ keys.transpose(-2, -1) / math.sqrt(self.head_size)  # (B, H, T, T)
        s = self.causal_mask[:length, :length]  # (T, T)
        scores = scores * s - 1e4 * (1 - s)
        return torch.softmax(scores, dim=-1)  # (B, H, T, T)
        # END SOLUTION

    def apply_attention(self, queries, keys, values):
        """`(B, H, T, head_size)` three times -> `(B, T, H * head_size)`: merged heads of A V."""
        # BEGIN SOLUTION
        weights = self.attention_dropout(self.get_attention_weights(queries, keys))  # (B, H, T, T)
        return self.merge_heads(weights @ values)  # (B, H, T, D) -> (B, T, H * D)
        # END SOLUTION

    def split_heads(self, tensor):
        """`(B, T, H * dim)` -> `(B, H, T, dim)` with `y[b, h, t, i] = x[b, t, h * dim + i]`."""
        # BEGIN SOLUTION
        batch_size, length, width = tensor.shape
        tensor = tensor.view(batch_size, length, self.num_heads, width // self.num_heads)  # (B, T, H, dim)
        return tensor.transpose(1, 2)  # (B, H, T, dim)
        # END SOLUTION

    def merge_heads(self, tensor):
        """`(B, H, T, dim)` -> `(B, T, H * dim)`: the inverse of `split_heads`."""
        # BEGIN SOLUTION
        batch_size, num_heads, length, dim = tensor.shape
        tensor = tensor.transpose(1, 2)  # (B, T, H, dim)
        return tensor.reshape(batch_size, length, num_heads * dim)  # (B, T, H * dim)
        # END SOLUTION

    def forward(self, hidden_states):
        """`hidden_states` `(B, T, H * head_size)` with `T <= sequence_length` -> same shape."""
        # BEGIN SOLUTION NO PROMPT
        if self.fused:
            return self.fused_forward(hidden_states)
        # END SOLUTION
        # BEGIN SOLUTION
        check_length(hidden_states.shape[1], self.sequence_length)
        queries = self.split_heads(self.queries(hidden_states))  # (B, H, T, D)
        keys = self.split_heads(self.keys(hidden_states))  # (B, H, T, D)
        values = self.split_heads(self.values(hidden_states))  # (B, H, T, D)
        attended = self.apply_attention(queries, keys, values)  # (B, T, H * D)
        return self.residual_dropout(self.output(attended))  # (B, T, H * D)
        # END SOLUTION

    # BEGIN SOLUTION NO PROMPT
    def fused_forward(self, hidden_states):
        """`forward` with `fused`: the three maps as one product, then PyTorch's attention kernel.

        The same function as the three maps, `get_attention_weights` and `apply_attention` (flash
        attention on a GPU; dropout drawn inside the kernel). It has no second derivatives (a graph
        of the gradient raises); the course's path (`fused = False`) has them.
        """
        check_length(hidden_states.shape[1], self.sequence_length)
        # The same three maps as one product with their weights stacked: a third of the kernel
        # launches forward and backward (and of autocast's casts), which bound a GPU step.
        weight = torch.cat([self.queries.weight, self.keys.weight, self.values.weight])  # (3HD, HD)
        bias = torch.cat([self.queries.bias, self.keys.bias, self.values.bias])  # (3HD,)
        stacked = F.linear(hidden_states, weight, bias)  # (B, T, 3HD)
        queries, keys, values = (self.split_heads(part) for part in stacked.chunk(3, dim=-1))  # (B, H, T, D) each
        # The kernel draws its own mask: nn.Dropout cannot reach weights it never materialises.
        dropout_p = self.attention_dropout.p if self.training else 0.0
        attended = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p,
                                                  is_causal=True)  # (B, H, T, D)
        return self.residual_dropout(self.output(self.merge_heads(attended)))  # (B, T, H * D)
    # END SOLUTION


class Block(nn.Module):
    """GPT-1's post-norm transformer block.

    `dropout` (keyword-only, default 0) goes to the attention (its weights and output) and, in train
    mode, drops units of the MLP's output before it is added to the residual.
    """

    def __init__(self, head_size, mlp_hidden_size, num_heads, sequence_length, *, dropout=0.0):
        super().__init__()
        self.head_size = head_size
        self.mlp_hidden_size = mlp_hidden_size
        self.num_heads = num_heads
        self.sequence_length = sequence_length
        self.hidden_size = width = head_size * num_heads
        self.attention = MultiHeadedAttention(head_size, num_heads, sequence_length, dropout=dropout)
        self.norm1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_hidden_size),
            nn.GELU(),
            nn.Linear(mlp_hidden_size, width),
        )
        self.mlp_dropout = nn.Dropout(dropout)
        self.norm2 = LayerNorm(width)

    def forward(self, hidden_states):
        """`(B, T, C)` -> `(B, T, C)`."""
        attended = self.norm1(hidden_states + self.attention(hidden_states))  # (B, T, C)
        return self.norm2(attended + self.mlp_dropout(self.mlp(attended)))  # (B, T, C)


class MiniGPT1(LanguageModel, nn.Module):
    """The course's MiniGPT1.

    `dropout` (keyword-only, default 0) is GPT-1's one rate for every dropout, active in train mode
    only: on the summed embeddings (in `forward`, so `get_embeddings` stays the course's plain
    sum), on the attention weights and on both residual branches of every Block. With 0 the
    outputs, the random-number stream and the state_dict are exactly those of the course's model.
    """

    def __init__(self, vocabulary_size=40479, embedding_size=768, sequence_length=256, num_heads=12,
                 num_layers=4, learn_embeddings=False, _tokens_embedding_weight=None,
                 _positional_embedding_weight=None, *, dropout=0.0):
        super().__init__()
        if embedding_size % num_heads:
            raise ValueError(f"embedding_size={embedding_size} is not a multiple of "
                             f"num_heads={num_heads}; choose sizes with embedding_size % num_heads == 0")
        self.vocabulary_size = vocabulary_size
        self.embedding_size = embedding_size
        self.sequence_length = sequence_length
        self.num_heads = num_heads
        self.head_size = embedding_size // num_heads
        self.num_layers = num_layers
        self.learn_embeddings = learn_embeddings
        self.dropout = dropout

        self.embedding = GPT1Embedding(vocabulary_size, embedding_size, sequence_length,
                                       _tokens_embedding_weight=_tokens_embedding_weight,
                                       _positional_embedding_weight=_positional_embedding_weight)
        self.embedding_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList([
            Block(self.head_size, 4 * embedding_size, num_heads, sequence_length,
                  dropout=dropout)
            for _ in range(num_layers)
        ])
        self.classifier = nn.Linear(embedding_size, vocabulary_size, bias=False)
        # Tie: one Parameter, so the output layer always reads the embedding as it is now.
        self.classifier.weight = self.embedding.tokens.weight
        for parameter in self.embedding.parameters():
            parameter.requires_grad_(learn_embeddings)

    def get_embeddings(self, inputs):
        """`inputs` `(B, T)` -> `(B, T, embedding_size)`: token plus position `0..T-1` embeddings."""
        # BEGIN SOLUTION
        check_length(inputs.shape[1], self.sequence_length)  # from the shape: no wait for a GPU
        positions = torch.arange(inputs.shape[1], device=inputs.device)  # (T,)
        return self.embedding(inputs, positions.unsqueeze(0).expand_as(inputs))  # (B, T, C)
        # END SOLUTION

    def forward(self, inputs):
        """`inputs` LongTensor `(B, T)`, `T <= sequence_length` -> log-probabilities `(B, T, V)`."""
        # BEGIN SOLUTION
        # Its own loop rather than a call to `features`: the starter's `features` calls `forward`.
        hidden_states = self.embedding_dropout(self.get_embeddings(inputs))  # (B, T, C)
        for layer in self.layers:
            hidden_states = layer(hidden_states)  # (B, T, C)
        logits = self.classifier(hidden_states)  # (B, T, V)
        return F.log_softmax(logits, dim=-1)
        # END SOLUTION

    def loss(self, log_probas, targets, mask):
        """Loss of a batch.

        Parameters
        ----------
        log_probas : FloatTensor of shape `(B, T, V)`, the output of `forward`.
        targets : LongTensor of shape `(B, T)`, the id of the next token at each position.
        mask : FloatTensor of shape `(B, T)`, 1 for a real token and 0 for padding.

        Returns
        -------
        A scalar: the mean over sequences of each sequence's mean NLL over its unpadded positions.
        """
        # BEGIN SOLUTION
        return super().loss(log_probas, targets, mask)
        # END SOLUTION

    # The shared interface (utils/language_model.py); `step` is its default.
    def predict(self, inputs):
        return self(inputs)

    @property
    def output_weight(self):
        return self.classifier.weight

    # BEGIN SOLUTION NO PROMPT
    # `forward` without the output layer: the default of utils/language_model.py computes the logits.
    def features(self, inputs):
        hidden_states = self.embedding_dropout(self.get_embeddings(inputs))  # (B, T, C)
        for layer in self.layers:
            hidden_states = layer(hidden_states)  # (B, T, C)
        return hidden_states
    # END SOLUTION

    @classmethod
    def load_embeddings_from(cls, filename, num_heads=12, num_layers=4, learn_embeddings=False, *,
                             dropout=0.0):
        """A MiniGPT1 built on `tokens` `(V, C)` and `position` `(L, C)` of an npz; `sequence_length = L`."""
        arrays = load_embedding_arrays(filename)
        tokens, position = arrays["tokens"], arrays["position"]
        return cls(tokens.shape[0], tokens.shape[1], position.shape[0], num_heads, num_layers,
                   learn_embeddings, _tokens_embedding_weight=tokens,
                   _positional_embedding_weight=position, dropout=dropout)
