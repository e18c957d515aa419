"""The rubric: the handout's points (36) split over the graded functions and their named checks.

Each graded function is one Gradescope test named `Class.method: summary`; its points are the sum
of its checks', and a failed check costs its own points only.

    question    function                               checks (points)                          total
    LSTM        LSTM.forward                           shape 1, hidden-state shapes 1,            5
                                                       log-probabilities 1, values 1,
                                                       hidden-state values 1
                LSTM.loss                              scalar 1, full mask 1, ragged mask 2       4
    LayerNorm   LayerNorm.forward                      shape 1, normalised 2, weight and bias 1,  5
                                                       gradient 1
    attention   MultiHeadedAttention.split_heads       shape 1, values 2                          3
                MultiHeadedAttention.merge_heads       shape 1, values 2                          3
                MultiHeadedAttention.get_attention_weights
                                                       shape 1, causal mask 1, values 2           4
                MultiHeadedAttention.apply_attention   shape 1, values 2                          3
                MultiHeadedAttention.forward           shape 1, causal 1, values 2                4
    MiniGPT1    MiniGPT1.get_embeddings                shape 1, values 1                          2
                MiniGPT1.forward                       shape 0.5, log-probabilities 0.5, values 1 2
                MiniGPT1.loss                          full mask 0.5, ragged mask 0.5             1
"""
from dataclasses import dataclass

LSTM_FILE = "lstm_solution.py"
GPT1_FILES = ("gpt1_solution.py", "gpt1_solution_template.py")  # the course's name first

QUESTION_POINTS = {"LSTM": 9, "LayerNorm": 5, "attention": 17, "MiniGPT1": 5}  # the handout's


@dataclass(frozen=True)
class GradedFunction:
    """One graded function: `name` is `Class.method`; `file` is "lstm" or "gpt1"; `checks` are
    `(check name, points)` pairs in the order they run."""
    name: str
    question: str
    file: str
    summary: str
    checks: tuple

    @property
    def points(self):
        return sum(points for _, points in self.checks)

    @property
    def class_name(self):
        return self.name.split(".")[0]

    @property
    def method(self):
        return self.name.split(".")[1]


RUBRIC = (
    GradedFunction("LSTM.forward", "LSTM", "lstm", "log-probabilities and hidden states",
                   (("shape", 1), ("hidden-state shapes", 1), ("log-probabilities", 1),
                    ("values", 1), ("hidden-state values", 1))),
    GradedFunction("LSTM.loss", "LSTM", "lstm", "per-sequence mean of the masked NLL",
                   (("scalar", 1), ("full mask", 1), ("ragged mask", 2))),
    GradedFunction("LayerNorm.forward", "LayerNorm", "gpt1", "layer normalisation",
                   (("shape", 1), ("normalised", 2), ("weight and bias", 1), ("gradient", 1))),
    GradedFunction("MultiHeadedAttention.split_heads", "attention", "gpt1", "(B, T, H*D) -> (B, H, T, D)",
                   (("shape", 1), ("values", 2))),
    GradedFunction("MultiHeadedAttention.merge_heads", "attention", "gpt1", "(B, H, T, D) -> (B, T, H*D)",
                   (("shape", 1), ("values", 2))),
    GradedFunction("MultiHeadedAttention.get_attention_weights", "attention", "gpt1",
                   "causal attention weights",
                   (("shape", 1), ("causal mask", 1), ("values", 2))),
    GradedFunction("MultiHeadedAttention.apply_attention", "attention", "gpt1", "weighted values, heads merged",
                   (("shape", 1), ("values", 2))),
    GradedFunction("MultiHeadedAttention.forward", "attention", "gpt1", "causal self-attention",
                   (("shape", 1), ("causal", 1), ("values", 2))),
    GradedFunction("MiniGPT1.get_embeddings", "MiniGPT1", "gpt1", "token plus position embeddings",
                   (("shape", 1), ("values", 1))),
    GradedFunction("MiniGPT1.forward", "MiniGPT1", "gpt1", "log-probabilities of the next token",
                   (("shape", 0.5), ("log-probabilities", 0.5), ("values", 1))),
    GradedFunction("MiniGPT1.loss", "MiniGPT1", "gpt1", "per-sequence mean of the masked NLL",
                   (("full mask", 0.5), ("ragged mask", 0.5))),
)

BY_NAME = {function.name: function for function in RUBRIC}
TOTAL_POINTS = sum(QUESTION_POINTS.values())

for _question, _points in QUESTION_POINTS.items():  # the split must add up to the handout's points
    assert sum(f.points for f in RUBRIC if f.question == _question) == _points, _question
