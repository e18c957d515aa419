"""How a batch becomes a loss: the reference path and the fused path, behind one module.

Legend: B batch, T time, C channels, V vocabulary, N = B * T.

`BatchLoss` wraps a model (either kind, through the interface of utils/language_model.py); it is
what the training loop calls and what DistributedDataParallel / torch.compile wrap.

- reference path (`fused=False`): `model.predict` -> dense log-probabilities `(B, T, V)` -> gather,
  the course's explicit attention and layer norms differentiated by autograd, in fp32;
- fused path (`fused=True`): scaled-dot-product attention, layer norms with a hand-derived
  backward pass, and the NLL from the features `(B, T, C)` and the tied output weight `(V, C)`
  (`fused_token_nll`), which never builds the dense log-probabilities; under autocast the matmuls
  run in bf16 or fp16 while the log-sum-exp and the loss stay fp32.

Both give the course's loss and the summed NLL and token count that exact perplexity needs.
"""
import contextlib
import math

import torch
from torch import nn

from utils.language_model import sequence_nll, token_nll


# On CUDA the output matmul's vocabulary is padded to a multiple of this: at GPT-1's odd vocabulary
# a row of bf16 logits has an odd width, at which cuBLAS loses its tensor-core kernels
# (docs/PERFORMANCE.md has the measurement). On the CPU padding gains nothing and would copy the
# whole fp32 matrix at every call.
CUDA_VOCABULARY_MULTIPLE = 64


def padded_matrix(weight, dtype, multiple):
    """`weight` `(V, C)` in `dtype`, with zero rows up to V' = a multiple of `multiple`: `(V', C)`."""
    extra = -weight.shape[0] % multiple
    matrix = weight.to(dtype)
    return torch.nn.functional.pad(matrix, (0, 0, 0, extra)) if extra else matrix


class ChunkedNLL(torch.autograd.Function):
    """NLL of each row's target under `log_softmax(features @ weight.T)`, a few rows at a time.

    `features` `(N, C)`, `weight` `(V, C)`, `targets` `(N,)` -> `(N,)` fp32. Only a `(rows, V')`
    block of logits (then of probabilities, in the same buffer) and one of fp32 log-probabilities
    exist at any moment, each one buffer reused by every block (on the CPU a fresh block would be
    mapped and zeroed by the kernel every time: glibc maps each allocation above 32 MiB). V' pads
    the vocabulary to a multiple of `multiple` (64 on CUDA: see CUDA_VOCABULARY_MULTIPLE); the
    padded columns' logits are set to -inf, so they take no probability. Since row i's NLL depends
    on row i of `features` alone, the forward pass also stores its gradient

        J[i] = (softmax_i - onehot(target_i)) @ weight = softmax_i @ weight - weight[target_i]   (N, C)

    and the backward pass is `grad_nll[:, None] * J`, with no second matmul. Only when `weight`
    itself learns does the backward pass recompute the logits, block by block, from the
    log-normalisers kept for it. Matmuls run in `compute_dtype` (bf16 on the fused CUDA path); the
    log-softmax, the NLL and the log-normalisers are fp32.
    """

    @staticmethod
    def forward(ctx, features, weight, targets, rows, compute_dtype, multiple):
        inputs, matrix = features.to(compute_dtype), padded_matrix(weight, compute_dtype, multiple)  # (N, C), (V', C)
        count, device, vocabulary = features.shape[0], features.device, weight.shape[0]
        nll = torch.empty(count, dtype=torch.float32, device=device)  # (N,)
        need_jacobian, need_normalisers = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        jacobian = torch.empty(features.shape, dtype=torch.float32, device=device) if need_jacobian else None
        log_normalisers = torch.empty(count, dtype=torch.float32, device=device) if need_normalisers else None
        rows = max(1, min(rows, count))
        width = matrix.shape[0]
        logits = torch.empty((rows, width), dtype=compute_dtype, device=device)  # (rows, V')
        log_probas = torch.empty((rows, width), dtype=torch.float32, device=device)  # (rows, V')
        for start in range(0, count, rows):
            block = slice(start, start + rows)
            size = min(rows, count - start)
            block_logits, block_log_probas = logits[:size], log_probas[:size]
            torch.mm(inputs[block], matrix.t(), out=block_logits)  # (size, V')
            block_logits[:, vocabulary:] = -math.inf  # the padding takes no probability
            torch.log_softmax(block_logits, dim=1, dtype=torch.float32, out=block_log_probas)
            target = targets[block].unsqueeze(1)  # (size, 1)
            nll[block] = -block_log_probas.gather(1, target).squeeze(1)
            if need_normalisers:  # log-sum-exp = logit - log-probability, at the target's column
                log_normalisers[block] = block_logits.gather(1, target).squeeze(1).float() + nll[block]
            if need_jacobian:
                # The probabilities, in compute_dtype for the matmul, overwrite a buffer done with.
                block_probas = (block_log_probas.exp_() if compute_dtype == torch.float32
                                else torch.exp(block_log_probas, out=block_logits))  # (size, V')
                jacobian[block] = (block_probas @ matrix).float() - matrix[targets[block]].float()  # (size, C)
        ctx.rows, ctx.compute_dtype, ctx.multiple = rows, compute_dtype, multiple
        ctx.save_for_backward(features, weight, targets, log_normalisers, jacobian)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        features, weight, targets, log_normalisers, jacobian = ctx.saved_tensors
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_features = (grad_nll.unsqueeze(1) * jacobian).to(features.dtype)  # (N, C)
        if ctx.needs_input_grad[1]:
            # grad_weight = (softmax - onehot)^T @ (grad_nll * inputs): the softmax part by a matmul
            # per block, the onehot part by adding rows at the targets. The padded rows are dropped.
            inputs, matrix = features.to(ctx.compute_dtype), padded_matrix(weight, ctx.compute_dtype, ctx.multiple)
            grad_weight = torch.zeros(matrix.shape, dtype=torch.float32, device=weight.device)  # (V', C)
            for start in range(0, features.shape[0], ctx.rows):
                block = slice(start, start + ctx.rows)
                weighted = inputs[block] * grad_nll[block].unsqueeze(1).to(ctx.compute_dtype)  # (rows, C)
                shifted = torch.sub(inputs[block] @ matrix.t(), log_normalisers[block].unsqueeze(1))  # fp32
                probas = shifted.exp_().to(ctx.compute_dtype)  # (rows, V') softmax
                grad_weight += (probas.t() @ weighted).float()  # (V', C)
                grad_weight.index_add_(0, targets[block], weighted.float(), alpha=-1)
            grad_weight = grad_weight[:weight.shape[0]].to(weight.dtype)
        return grad_features, grad_weight, None, None, None, None


def fused_token_nll(features, weight, targets, block_bytes=None, vocabulary_multiple=None):
    """NLL of each target from the last layer's input: `(B, T, C)`, `(V, C)`, `(B, T)` -> `(B, T)` fp32.

    Equal to `token_nll(log_softmax(features @ weight.T), targets)` without the dense `(B, T, V)`
    tensors (see `ChunkedNLL`). Under autocast the matmuls take autocast's dtype. Blocks of fp32
    logits are about `block_bytes` (256 MiB: on the CPU smaller blocks make the matmul slower, see
    `python -m utils.benchmark`). The matmul's vocabulary is padded to a multiple of
    `vocabulary_multiple` (default: 64 on CUDA, none elsewhere).
    """
    batch_size, length, width = features.shape
    device_type = features.device.type
    if block_bytes is None:
        block_bytes = 2 ** 28
    if vocabulary_multiple is None:
        vocabulary_multiple = CUDA_VOCABULARY_MULTIPLE if device_type == "cuda" else 1
    rows = max(1, block_bytes // (4 * weight.shape[0]))
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else features.dtype)
    nll = ChunkedNLL.apply(features.reshape(batch_size * length, width), weight,
                           targets.reshape(-1), rows, compute_dtype, vocabulary_multiple)  # (N,)
    return nll.view(batch_size, length)  # (B, T)


def set_fused_kernels(model, enabled):
    """Switch every module of `model` that has a `fused` flag (MiniGPT1's attention and layer norms)."""
    for module in model.modules():
        if isinstance(getattr(module, "fused", None), bool):
            module.fused = enabled


class BatchLoss(nn.Module):
    """`forward(source, target, mask, scale)` -> `(loss, nll_sum, token_count)`.

    `loss` is `scale` times the sum over the batch's non-empty sequences of their mean NLL; the
    loop passes `scale = world_size / sequences in the global batch` so that the gradients averaged
    by DistributedDataParallel equal the course's loss over the whole global batch (for one process,
    `scale = 1 / sequences`: the plain mean). `nll_sum` and `token_count` are fp32 sums over real
    tokens, detached.
    """

    def __init__(self, model, fused=True, autocast_dtype=None):
        super().__init__()
        self.model = model
        self.fused = fused
        self.autocast_dtype = autocast_dtype
        set_fused_kernels(model, fused)

    def token_nll(self, source, target):
        """Per-token NLL `(B, T)` in fp32 by the chosen path."""
        device_type = source.device.type
        autocast = (torch.autocast(device_type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            if self.fused:
                features = self.model.features(source)  # (B, T, C)
                return fused_token_nll(features, self.model.output_weight, target)
            log_probas = self.model.predict(source)  # (B, T, V)
        return token_nll(log_probas.float(), target)  # (B, T)

    def forward(self, source, target, mask, scale):
        per_sequence, masked, lengths = sequence_nll(self.token_nll(source, target), mask)  # (B,), (B, T), (B,)
        return per_sequence.sum() * scale, masked.detach().sum(), lengths.sum()
