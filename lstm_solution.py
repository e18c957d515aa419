# BEGIN SOLUTION NO PROMPT
# `# BEGIN SOLUTION` / `# END SOLUTION` mark the graded answers, which `python -m utils.starter` turns
# into TODOs; `# BEGIN SOLUTION NO PROMPT` marks solution-only code the starter drops (docs/STARTER.md).
# END SOLUTION
"""The LSTM language model of the course (IFT6135 assignment 2), with weights tied to its input.

Legend: B batch, T time, E embedding size, H hidden size, L layers, V vocabulary.

    ids (B, T) -> embedding (B, T, E) -> nn.LSTM (B, T, H) -> Linear H->E, ReLU
               -> Linear E->V (the embedding matrix itself) -> log_softmax (B, T, V)

The embedding, and with it the tied output weight, is frozen unless `learn_embeddings=True`: with
the pretrained GPT-1 embeddings only the LSTM and the first classifier layer learn.

With `dropout > 0` units are dropped, in train mode only, on the non-recurrent connections: the
embeddings, between LSTM layers, and the last layer's output (see `LSTM`).
"""
import torch
import torch.nn.functional as F
from torch import nn

from utils.embeddings import load_embedding_arrays
from utils.language_model import LanguageModel


class LSTM(LanguageModel, nn.Module):
    """The course's LSTM language model.

    `dropout` (keyword-only, default 0) is the probability of zeroing a unit, in train mode only,
    on the embeddings (B, T, E), between layers (B, T, H) and on the last layer's output (B, T, H)
    before the classifier, as in Zaremba et al. (2014) and pytorch/examples' word_language_model;
    the recurrent state is never dropped. The last one is kept so that the course's one-layer
    model is not regularised on its input alone. With 0 the outputs, the random-number stream and
    the state_dict are exactly those of the course's model.
    """

    def __init__(self, vocabulary_size=40479, embedding_size=768, hidden_size=512, num_layers=1,
                 learn_embeddings=False, _embedding_weight=None, *, dropout=0.0):
        super().__init__()
        self.vocabulary_size = vocabulary_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.learn_embeddings = learn_embeddings
        self.dropout = dropout

        self.embedding = nn.Embedding(vocabulary_size, embedding_size, padding_idx=0,
                                      _weight=_embedding_weight)
        self.embedding_dropout = nn.Dropout(dropout)
        # nn.LSTM drops between its layers only, and warns when given a rate with one layer.
        self.lstm = nn.LSTM(embedding_size, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.output_dropout = nn.Dropout(dropout)
        self.classifier = nn.Sequential(
            nn.Linear(hidden_size, embedding_size),
            nn.ReLU(),
            nn.Linear(embedding_size, vocabulary_size, bias=False),
        )
        # Tie: one Parameter, so the output layer always reads the embedding as it is now.
        self.classifier[2].weight = self.embedding.weight
        self.embedding.weight.requires_grad_(learn_embeddings)

    def forward(self, inputs, hidden_states):
        """Log-probabilities of the next token.

        Parameters
        ----------
        inputs : LongTensor of shape `(B, T)`.
        hidden_states : tuple `(h, c)`, each FloatTensor of shape `(num_layers, B, hidden_size)`.

        Returns
        -------
        log_probas : FloatTensor of shape `(B, T, vocabulary_size)`.
        hidden_states : tuple `(h, c)` after the last time step, shapes as given.
        """
        # BEGIN SOLUTION
        embedded = self.embedding_dropout(self.embedding(inputs))  # (B, T, E)
        outputs, hidden_states = self.lstm(embedded, hidden_states)  # (B, T, H)
        logits = self.classifier(self.output_dropout(outputs))  # (B, T, V)
        return F.log_softmax(logits, dim=-1), hidden_states
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

    # BEGIN SOLUTION NO PROMPT
    def _run(self, inputs, hidden_states):
        """`forward` up to the output layer, `lstm_by_layer` under CUDA autocast: `(B, T, E)`, states."""
        embedded = self.embedding_dropout(self.embedding(inputs))  # (B, T, E)
        if embedded.is_cuda and torch.is_autocast_enabled("cuda") and self.num_layers > 1:
            outputs, hidden_states = self.lstm_by_layer(embedded, hidden_states)  # (B, T, H)
        else:
            outputs, hidden_states = self.lstm(embedded, hidden_states)  # (B, T, H)
        features = self.classifier[1](self.classifier[0](self.output_dropout(outputs)))  # (B, T, E)
        return features, hidden_states

    def lstm_by_layer(self, inputs, hidden_states):
        """`self.lstm` computed one layer at a time, on its own weights: the same outputs and states.

        Under CUDA autocast cuDNN runs the LSTM in fp16 (the training loop scales the loss for it),
        and its persistent kernels, several times faster at these sizes, take one layer per call.
        In train mode the inputs of layers 1..L-1 are dropped at `self.lstm.dropout`, as
        `self.lstm` does (the masks are drawn differently, so only the distribution is the same).
        """
        h, c = hidden_states  # each (L, B, H)
        outputs, last_h, last_c = inputs, [], []
        for layer in range(self.num_layers):
            if layer > 0:
                outputs = F.dropout(outputs, self.lstm.dropout, self.training)  # (B, T, H)
            weights = [getattr(self.lstm, f"{name}_l{layer}")
                       for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            outputs, h_layer, c_layer = torch.lstm(
                outputs, (h[layer:layer + 1], c[layer:layer + 1]), weights, has_biases=True,
                num_layers=1, dropout=0.0, train=self.training, bidirectional=False,
                batch_first=True)  # (B, T, H), (1, B, H), (1, B, H)
            last_h.append(h_layer)
            last_c.append(c_layer)
        return outputs, (torch.cat(last_h), torch.cat(last_c))
    # END SOLUTION

    def initial_states(self, batch_size, device=None):
        """Zero `(h, c)`, each `(num_layers, batch_size, hidden_size)`, on the parameters' device."""
        if device is None:
            device = self.embedding.weight.device
        shape = (self.num_layers, batch_size, self.hidden_size)
        return (torch.zeros(shape, device=device), torch.zeros(shape, device=device))

    # The shared interface (utils/language_model.py): sequences start from zero states.
    def predict(self, inputs):
        return self(inputs, self.initial_states(inputs.shape[0]))[0]

    @property
    def output_weight(self):
        return self.classifier[2].weight

    # BEGIN SOLUTION NO PROMPT
    # Faster than the defaults of utils/language_model.py, which the starter falls back to.
    def features(self, inputs):
        return self._run(inputs, self.initial_states(inputs.shape[0]))[0]

    def step(self, new_tokens, state=None):
        # The recurrence carries the whole past, so only the new tokens are fed; and only the last
        # position's distribution is computed, so a long prompt never builds its (T, V) outputs.
        if state is None:
            state = self.initial_states(new_tokens.shape[0])
        features, state = self._run(new_tokens, state)  # (B, T_new, E)
        logits = self.classifier[2](features[:, -1])  # (B, V)
        return F.log_softmax(logits, dim=-1), state
    # END SOLUTION

    @classmethod
    def load_embeddings_from(cls, filename, hidden_size=512, num_layers=1, learn_embeddings=False, *,
                             dropout=0.0):
        """An LSTM whose embedding is the `tokens` array `(vocabulary_size, embedding_size)` of an npz."""
        tokens = load_embedding_arrays(filename, keys=("tokens",))["tokens"]
        vocabulary_size, embedding_size = tokens.shape
        return cls(vocabulary_size, embedding_size, hidden_size, num_layers, learn_embeddings,
                   _embedding_weight=tokens, dropout=dropout)
