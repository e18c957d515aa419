"""The interface both language models share, so the training loop never asks which model it has.

Legend: B batch, T time, C channels (the width fed to the output layer), V vocabulary.

Every model in this package
- returns log-probabilities `(B, T, V)` from its course-defined `forward`;
- offers `predict(inputs)`: the same log-probabilities from the token ids alone (the LSTM starts
  from zero states), which is what training and evaluation use;
- offers `features(inputs)` `(B, T, C)` and `output_weight` `(V, C)` with
  `predict(x) == log_softmax(features(x) @ output_weight.T)`, so a fused loss can skip the dense
  `(B, T, V)` log-probabilities;
- offers `step(new_tokens, state)` for generation: log-probabilities of the next token given the
  tokens fed so far, carrying whatever state the model needs;
- shares `loss(log_probas, targets, mask)` defined here once.

`features` and `step` have defaults here built on `predict` alone, so the student's starter
(utils/starter.py), whose models lack the solution's faster overrides, trains and generates.
"""
import math

import torch


def perplexity(loss):
    """exp(mean NLL per token), the perplexity of a mean loss in nats; inf where exp overflows."""
    return math.exp(loss) if loss < 700 else math.inf


def token_nll(log_probas, targets):
    """Negative log-likelihood of each target: `(B, T, V)`, `(B, T)` -> `(B, T)`."""
    return -log_probas.gather(2, targets.unsqueeze(2)).squeeze(2)  # (B, T)


def sequence_nll(nll, mask):
    """Each sequence's mean NLL over its unpadded positions: the course's loss before its last mean.

    `nll` `(B, T)`, `mask` `(B, T)` of 0/1 -> `(per_sequence (B,), masked_nll (B, T), lengths (B,))`.
    A sequence with no unpadded position gets 0, and padded positions are 0 in `masked_nll`.
    """
    mask = mask.to(nll.dtype)
    # where(), not a product: a padded position may hold an infinite NLL and inf * 0 is NaN.
    masked = torch.where(mask > 0, nll, torch.zeros_like(nll))  # (B, T)
    lengths = mask.sum(dim=1)  # (B,)
    return masked.sum(dim=1) / lengths.clamp(min=1), masked, lengths


def sequence_mean_loss(nll, mask):
    """The course's loss from per-token NLL `(B, T)` and a 0/1 `mask` `(B, T)`.

    Mean NLL over each sequence's unpadded positions, then the mean over the sequences. A
    sequence with no unpadded position is left out of the second mean (it has no loss to give),
    and a batch of such sequences gives 0 rather than NaN.
    """
    per_sequence, _, lengths = sequence_nll(nll, mask)  # (B,), _, (B,)
    return per_sequence.sum() / (lengths > 0).sum().clamp(min=1)


class LanguageModel:
    """Mixin giving both models the shared loss; subclasses define the abstract methods below."""

    def loss(self, log_probas, targets, mask):
        """The course's loss of `(B, T, V)` log-probabilities, `(B, T)` targets and 0/1 mask: a
        scalar (the models' own `loss` docstrings, which the starter keeps, spell it out)."""
        return sequence_mean_loss(token_nll(log_probas, targets), mask)

    def predict(self, inputs):
        """Log-probabilities `(B, T, V)` of the next token at every position of `inputs` `(B, T)`."""
        raise NotImplementedError

    def features(self, inputs):
        """The `(B, T, C)` activations that the final `(V, C)` projection turns into logits.

        By default the input of the `nn.Linear` whose weight is `output_weight`, caught by a hook
        while `predict` runs: correct for any model, but it computes the logits it was meant to skip.
        """
        layer = self.output_layer()
        captured = []
        handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.predict(inputs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"predict called the output layer {len(captured)} times, not once; "
                               f"override features() for this model")
        return captured[0]  # (B, T, C)

    def output_layer(self):
        """The `nn.Linear` whose weight is `output_weight` (the last layer)."""
        weight = self.output_weight
        for module in self.modules():
            if isinstance(module, torch.nn.Linear) and module.weight is weight:
                return module
        raise RuntimeError(f"{type(self).__name__} has no nn.Linear whose weight is output_weight")

    @property
    def output_weight(self):
        """The `(V, C)` weight of the last (bias-free) linear layer."""
        raise NotImplementedError

    def step(self, new_tokens, state=None):
        """Next-token log-probabilities `(B, V)` after feeding `new_tokens` `(B, T_new)`.

        `state` is what a previous call returned (None to start); returns `(log_probas, state)`.
        By default the state is the context itself, cut to the last `sequence_length` tokens
        where the model has one, and `predict` runs on all of it at every call.
        """
        context = new_tokens if state is None else torch.cat([state, new_tokens], dim=1)  # (B, T)
        length = getattr(self, "sequence_length", None)
        if length is not None:
            context = context[:, -length:]
        return self.predict(context)[:, -1], context  # (B, V), (B, T)
