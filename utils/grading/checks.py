"""Each graded function against the reference, in the worker, with the others substituted.

Legend: B batch, T time, C channels, H heads, D head size, V vocabulary, L layers.

Every function is graded alone: the student's object is built, then the reference versions of the
other graded methods it could call are bound onto the instance (`types.MethodType`), written here
over the course's attributes only (`num_heads`, `head_size`, the course's constructor arguments
and layer names). A MiniGPT1 is built with the reference's `Block`, `MultiHeadedAttention` and
`LayerNorm` in the student's module while its `__init__` runs, so its blocks are the reference's.

`MultiHeadedAttention.forward` (its layers are named by the student): shape and causality are
properties; for the values the student's own Linear layers are matched to the roles queries,
keys, values, output: four Linear(C, C) in each of the 24 orders, or one Linear(C, 3C) plus one
Linear(C, C) with the three chunks in each order, and the check passes when one assignment
reproduces the reference computed on those layers.

A check reads a message (the handout's "x is your value, y the expected one", the first differing
index, the shapes) or None when it passes.
"""
import itertools
import math
import traceback
import types

import torch
import torch.nn.functional as F
from torch import nn

from utils.grading.forbidden import ForbiddenFunctionError

ATOL, RTOL = 1e-5, 1e-4


class Mismatch(Exception):
    """A check's failure, its message meant for the student as it is."""


def describe_exception(error, student_files=()):
    """`raised TypeError: ... (gpt1_solution.py line 12, in forward)`: where in the student's code."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if any(frame.filename.endswith(name) for name in student_files)]
    where = ""
    if frames:
        frame = frames[-1]
        where = f" ({frame.filename.rsplit('/', 1)[-1]} line {frame.lineno}, in {frame.name})"
    text = str(error).strip().splitlines()
    return f"raised {type(error).__name__}: {text[0] if text else ''}{where}"


class Checks:
    """The named checks of one graded function; an exception fails the check it happens in."""

    def __init__(self, student_files):
        self.student_files = student_files
        self.results = []
        self.forbidden = None

    def run(self, name, body):
        try:
            message = body()
        except Mismatch as error:
            message = str(error)
        except ForbiddenFunctionError as error:
            self.forbidden = message = str(error)
        except (Exception, SystemExit) as error:
            message = describe_exception(error, self.student_files)
        self.results.append({"name": name, "passed": message is None, "message": message})


def once(call):
    """`call` run at most once: its value, or its exception raised again at each read."""
    outcome = []

    def get():
        if not outcome:
            try:
                outcome.append((call(), None))
            except (Exception, SystemExit) as error:
                outcome.append((None, error))
        value, error = outcome[0]
        if error is not None:
            raise error
        return value
    return get


def shape_of(value):
    return tuple(value.shape) if torch.is_tensor(value) else type(value).__name__


def check_shape(yours, shape, what="the output"):
    if not torch.is_tensor(yours):
        return f"{what}: {type(yours).__name__} is your value, a tensor of shape {tuple(shape)} the expected one"
    if tuple(yours.shape) != tuple(shape):
        return f"{what}: shape {tuple(yours.shape)} is yours, {tuple(shape)} the expected one"
    return None


def compare(yours, expected, what="the output", atol=ATOL, rtol=RTOL):
    """None when `yours` matches `expected`; else the first differing index and both values."""
    message = check_shape(yours, expected.shape, what)
    if message:
        return message
    if yours.dtype != expected.dtype:
        return f"{what}: dtype {yours.dtype} is yours, {expected.dtype} the expected one"
    yours = yours.detach()
    close = torch.isclose(yours, expected, rtol=rtol, atol=atol)
    if bool(close.all()):
        return None
    index = tuple((~close).nonzero()[0].tolist())
    difference = (yours - expected).abs().nan_to_num(nan=float("inf")).max().item()
    return (f"{what}: at index {index}, {yours[index].item():.6g} is your value, "
            f"{expected[index].item():.6g} the expected one ({int((~close).sum())} of "
            f"{close.numel()} values differ, the largest by {difference:.3g}; shape {tuple(expected.shape)})")


# The reference implementations, over the course's attributes only.

def reference_split_heads(self, tensor):
    batch_size, length, width = tensor.shape
    return tensor.reshape(batch_size, length, self.num_heads, width // self.num_heads).transpose(1, 2)  # (B, H, T, D)


def reference_merge_heads(self, tensor):
    batch_size, num_heads, length, dim = tensor.shape
    return tensor.transpose(1, 2).reshape(batch_size, length, num_heads * dim)  # (B, T, H * D)


def reference_attention_weights(self, queries, keys):
    length = queries.shape[-2]
    scores = queries @ keys.transpose(-2, -1) / math.sqrt(self.head_size)  # (B, H, T, T)
    s = torch.tril(torch.ones(length, length, dtype=scores.dtype))  # (T, T)
    return torch.softmax(scores * s - 1e4 * (1 - s), dim=-1)  # (B, H, T, T)


def reference_apply_attention(self, queries, keys, values):
    weights = reference_attention_weights(self, queries, keys)  # (B, H, T, T)
    return reference_merge_heads(self, weights @ values)  # (B, T, H * D)


def reference_attention_forward(self, hidden_states, queries, keys, values, output):
    """The course's attention with the maps `queries`, `keys`, `values`, `output` (callables)."""
    split = [reference_split_heads(self, layer(hidden_states)) for layer in (queries, keys, values)]
    return output(reference_apply_attention(self, *split))  # (B, T, H * D)


def reference_get_embeddings(self, inputs):
    positions = torch.arange(inputs.shape[1])  # (T,)
    return self.embedding.tokens(inputs) + self.embedding.position(positions)  # (B, T, C)


def reference_gpt_forward(self, inputs):
    hidden_states = reference_get_embeddings(self, inputs)  # (B, T, C)
    for layer in self.layers:
        hidden_states = layer(hidden_states)
    return F.log_softmax(self.classifier(hidden_states), dim=-1)  # (B, T, V)


def reference_lstm_forward(self, inputs, hidden_states):
    outputs, hidden_states = self.lstm(self.embedding(inputs), hidden_states)  # (B, T, H)
    return F.log_softmax(self.classifier(outputs), dim=-1), hidden_states  # (B, T, V)


def reference_layer_norm(inputs, weight, bias, eps):
    mean = inputs.mean(dim=-1, keepdim=True)  # (*, 1)
    variance = ((inputs - mean) ** 2).mean(dim=-1, keepdim=True)  # (*, 1), biased
    return (inputs - mean) / torch.sqrt(variance + eps) * weight + bias


def reference_loss(log_probas, targets, mask):
    nll = -log_probas.gather(2, targets.unsqueeze(2)).squeeze(2)  # (B, T)
    return ((nll * mask).sum(dim=1) / mask.sum(dim=1)).mean()


ATTENTION_METHODS = {"split_heads": reference_split_heads, "merge_heads": reference_merge_heads,
                     "get_attention_weights": reference_attention_weights,
                     "apply_attention": reference_apply_attention}


def substitute(instance, references, keep=None):
    """Bind `references` (method name -> function) onto `instance`, all but `keep`."""
    for name, function in references.items():
        if name != keep:
            setattr(instance, name, types.MethodType(function, instance))
    return instance


# The graded functions. Small sizes: B batch, T time (T != H, so a missed transposition shows).

LSTM_SIZES = dict(vocabulary_size=50, embedding_size=16, hidden_size=12, num_layers=2)
GPT_SIZES = dict(vocabulary_size=50, embedding_size=16, sequence_length=8, num_heads=4, num_layers=2)
HEAD_SIZE, NUM_HEADS, SEQUENCE_LENGTH = 4, 3, 8


def generator(seed):
    return torch.Generator().manual_seed(seed)


def lstm_model(student):
    torch.manual_seed(0)
    sizes = LSTM_SIZES
    model = student.LSTM(sizes["vocabulary_size"], sizes["embedding_size"], sizes["hidden_size"],
                         sizes["num_layers"])
    return model.eval()


def gpt_model(student, reference):
    """The student's MiniGPT1, built with the reference's blocks, `get_embeddings` left as theirs."""
    torch.manual_seed(0)
    names = [name for name in ("Block", "MultiHeadedAttention", "LayerNorm") if hasattr(student, name)]
    saved = {name: getattr(student, name) for name in names}
    for name in names:
        setattr(student, name, getattr(reference, name))
    try:
        sizes = GPT_SIZES
        model = student.MiniGPT1(sizes["vocabulary_size"], sizes["embedding_size"], sizes["sequence_length"],
                                 sizes["num_heads"], sizes["num_layers"])
    finally:
        for name, value in saved.items():
            setattr(student, name, value)
    return model.eval()


def attention_module(student):
    torch.manual_seed(0)
    return student.MultiHeadedAttention(HEAD_SIZE, NUM_HEADS, SEQUENCE_LENGTH).eval()


def pair(value, what):
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise Mismatch(f"{what}: {type(value).__name__} is your value, a pair the expected one")
    return value


def check_log_probabilities(log_probas):
    if not torch.is_tensor(log_probas):
        return f"{type(log_probas).__name__} is your value, a tensor of log-probabilities the expected one"
    total = torch.logsumexp(log_probas.detach().float(), dim=-1)  # (B, T)
    wrong = (total.abs() > 1e-4).nonzero()
    if len(wrong):
        index = tuple(wrong[0].tolist())
        return (f"exp(log_probas) at position {index} sums to {total[index].exp().item():.6g} over the "
                f"vocabulary, 1 expected: return log-probabilities (log_softmax of the logits)")
    return None


def loss_inputs():
    g = generator(3)
    batch_size, length, vocabulary = 4, 6, 11
    log_probas = torch.log_softmax(3 * torch.randn(batch_size, length, vocabulary, generator=g), dim=-1)
    targets = torch.randint(0, vocabulary, (batch_size, length), generator=g)
    mask = torch.zeros(batch_size, length)
    for row, kept in enumerate((6, 4, 1, 3)):  # ragged lengths
        mask[row, :kept] = 1
    return log_probas, targets, mask


def grade_loss(model, checks, scalar_check=True):
    log_probas, targets, mask = loss_inputs()
    full = torch.ones_like(mask)
    full_loss = once(lambda: model.loss(log_probas, targets, full))
    ragged_loss = once(lambda: model.loss(log_probas, targets, mask))

    def scalar():
        value = full_loss()
        if not torch.is_tensor(value) or value.numel() != 1:
            return f"a {shape_of(value)} is your value, a scalar tensor the expected one"
        return None

    def value_of(call, expected, what):
        value = call()
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.reshape(())
        return compare(value, expected, what)

    if scalar_check:
        checks.run("scalar", scalar)
    checks.run("full mask", lambda: value_of(full_loss, reference_loss(log_probas, targets, full),
                                             "the loss with a mask of ones"))
    checks.run("ragged mask", lambda: value_of(ragged_loss, reference_loss(log_probas, targets, mask),
                                               "the loss with sequences of lengths 6, 4, 1, 3 (the mean "
                                               "over each sequence's unmasked tokens, then over sequences)"))


def grade_lstm_forward(student, reference, checks):
    model = lstm_model(student)
    sizes = LSTM_SIZES
    g = generator(1)
    inputs = torch.randint(1, sizes["vocabulary_size"], (3, 7), generator=g)
    state_shape = (sizes["num_layers"], 3, sizes["hidden_size"])
    states = (torch.randn(state_shape, generator=g), torch.randn(state_shape, generator=g))
    with torch.no_grad():
        expected, (expected_h, expected_c) = reference_lstm_forward(model, inputs, states)
        yours = once(lambda: pair(model(inputs, tuple(s.clone() for s in states)), "forward's result"))

    def hidden():
        h_c = pair(yours()[1], "the hidden states")
        return (check_shape(h_c[0], state_shape, "h") or check_shape(h_c[1], state_shape, "c"))

    def hidden_values():
        h_c = pair(yours()[1], "the hidden states")
        return compare(h_c[0], expected_h, "h") or compare(h_c[1], expected_c, "c")

    checks.run("shape", lambda: check_shape(yours()[0], expected.shape, "log_probas"))
    checks.run("hidden-state shapes", hidden)
    checks.run("log-probabilities", lambda: check_log_probabilities(yours()[0]))
    checks.run("values", lambda: compare(yours()[0], expected, "log_probas"))
    checks.run("hidden-state values", hidden_values)


def grade_lstm_loss(student, reference, checks):
    with torch.no_grad():
        grade_loss(lstm_model(student), checks)


def grade_layer_norm(student, reference, checks):
    width = 8
    torch.manual_seed(0)
    module = student.LayerNorm(width)
    eps = 1e-5  # the course's default, which LayerNorm(width) is built with: not read from the module
    g = generator(2)
    inputs = 3 * torch.randn(3, 5, width, generator=g) + 1.5
    weight, bias = torch.randn(width, generator=g), torch.randn(width, generator=g)

    def run(weight_value, bias_value):
        with torch.no_grad():
            module.weight.copy_(weight_value)
            module.bias.copy_(bias_value)
            return module(inputs)

    plain = once(lambda: run(torch.ones(width), torch.zeros(width)))
    affine = once(lambda: run(weight, bias))

    def gradient():
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
        upstream = torch.randn(inputs.shape, generator=generator(5))
        x = inputs.clone().requires_grad_(True)
        module.zero_grad()
        (module(x) * upstream).sum().backward()
        x_ref, w_ref, b_ref = (t.clone().requires_grad_(True) for t in (inputs, weight, bias))
        (reference_layer_norm(x_ref, w_ref, b_ref, eps) * upstream).sum().backward()
        if x.grad is None:
            return "no gradient reached the input: keep the computation in differentiable torch operations"
        return (compare(x.grad, x_ref.grad, "the gradient of the input")
                or compare(module.weight.grad, w_ref.grad, "the gradient of weight")
                or compare(module.bias.grad, b_ref.grad, "the gradient of bias"))

    checks.run("shape", lambda: check_shape(plain(), inputs.shape) or (
        f"dtype {plain().dtype} is yours, {inputs.dtype} the expected one" if plain().dtype != inputs.dtype else None))
    checks.run("normalised", lambda: compare(
        plain(), reference_layer_norm(inputs, torch.ones(width), torch.zeros(width), eps),
        "the output with weight 1 and bias 0 (mean 0, biased variance 1)"))
    checks.run("weight and bias", lambda: compare(affine(), reference_layer_norm(inputs, weight, bias, eps),
                                                  "the output with a random weight and bias"))
    checks.run("gradient", gradient)


def grade_head_reshape(student, checks, method, reference_function, input_shape):
    """`split_heads` or `merge_heads` (`method`) alone: shape, then values against the reference."""
    module = substitute(attention_module(student), ATTENTION_METHODS, keep=method)
    inputs = torch.randn(*input_shape, generator=generator(4))
    expected = reference_function(module, inputs)
    with torch.no_grad():
        yours = once(lambda: getattr(module, method)(inputs))
    checks.run("shape", lambda: check_shape(yours(), expected.shape))
    checks.run("values", lambda: compare(yours(), expected))


def grade_split_heads(student, reference, checks):
    grade_head_reshape(student, checks, "split_heads", reference_split_heads,
                       (2, 5, NUM_HEADS * HEAD_SIZE))  # (B, T, H * D) -> (B, H, T, D)


def grade_merge_heads(student, reference, checks):
    grade_head_reshape(student, checks, "merge_heads", reference_merge_heads,
                       (2, NUM_HEADS, 5, HEAD_SIZE))  # (B, H, T, D) -> (B, T, H * D)


def grade_attention_weights(student, reference, checks):
    module = substitute(attention_module(student), ATTENTION_METHODS, keep="get_attention_weights")
    g = generator(6)
    full = [torch.randn(2, NUM_HEADS, SEQUENCE_LENGTH, HEAD_SIZE, generator=g) for _ in range(2)]
    short = [torch.randn(2, NUM_HEADS, 5, HEAD_SIZE, generator=g) for _ in range(2)]
    with torch.no_grad():
        yours = once(lambda: module.get_attention_weights(*full))
        yours_short = once(lambda: module.get_attention_weights(*short))

    def causal():
        message = check_shape(yours(), (2, NUM_HEADS, SEQUENCE_LENGTH, SEQUENCE_LENGTH))
        if message:
            return message
        later = torch.triu(torch.ones(SEQUENCE_LENGTH, SEQUENCE_LENGTH, dtype=torch.bool), diagonal=1)
        leaks = ((yours().abs() > 1e-6) & later).nonzero()
        if len(leaks):
            b, h, t, s = leaks[0].tolist()
            return (f"position {t} (batch {b}, head {h}) gives weight {yours()[b, h, t, s].item():.3g} to the "
                    f"later position {s}, 0 expected: apply the causal mask before the softmax")
        return None

    checks.run("shape", lambda: check_shape(yours(), (2, NUM_HEADS, SEQUENCE_LENGTH, SEQUENCE_LENGTH)))
    checks.run("causal mask", causal)
    checks.run("values", lambda: compare(yours(), reference_attention_weights(module, *full))
               or compare(yours_short(), reference_attention_weights(module, *short),
                          f"the weights of a sequence of 5 < sequence_length={SEQUENCE_LENGTH} tokens"))


def grade_apply_attention(student, reference, checks):
    module = substitute(attention_module(student), ATTENTION_METHODS, keep="apply_attention")
    g = generator(7)
    queries, keys, values = (torch.randn(2, NUM_HEADS, 6, HEAD_SIZE, generator=g) for _ in range(3))
    expected = reference_apply_attention(module, queries, keys, values)  # (B, T, H * D)
    with torch.no_grad():
        yours = once(lambda: module.apply_attention(queries, keys, values))
    checks.run("shape", lambda: check_shape(yours(), expected.shape))
    checks.run("values", lambda: compare(yours(), expected))


def layer_assignments(module, width):
    """Each way to read the student's Linear layers as (queries, keys, values, output) maps."""
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    shapes = [(m.in_features, m.out_features) for m in layers]
    if shapes == [(width, width)] * 4:
        return list(itertools.permutations(layers))
    if sorted(shapes) == sorted([(width, width), (width, 3 * width)]):
        stacked = next(m for m in layers if m.out_features == 3 * width)
        output = next(m for m in layers if m.out_features == width)
        return [tuple((lambda x, i=i: stacked(x).chunk(3, dim=-1)[i]) for i in order) + (output,)
                for order in itertools.permutations(range(3))]
    raise Mismatch(f"your module's Linear layers (in, out) are {shapes}; the values check matches four "
                   f"Linear({width}, {width}) (queries, keys, values, output) or one Linear({width}, "
                   f"{3 * width}) and one Linear({width}, {width})")


def grade_attention_forward(student, reference, checks):
    module = substitute(attention_module(student), ATTENTION_METHODS)
    width = NUM_HEADS * HEAD_SIZE
    g = generator(8)
    inputs = torch.randn(2, SEQUENCE_LENGTH, width, generator=g)  # (B, T, C)
    changed = inputs.clone()
    changed[:, 4:] = torch.randn(2, SEQUENCE_LENGTH - 4, width, generator=g)
    with torch.no_grad():
        yours = once(lambda: module(inputs))
        yours_changed = once(lambda: module(changed))

    def causal():
        message = check_shape(yours(), inputs.shape)
        if message:
            return message
        message = compare(yours_changed()[:, :4], yours()[:, :4],
                          "the outputs at positions 0-3 after changing the inputs at positions 4-7")
        return message and message + " (a position must not see later ones: the causal mask)"

    def values():
        message = check_shape(yours(), inputs.shape)
        if message:
            return message
        first = None
        with torch.no_grad():
            for maps in layer_assignments(module, width):
                message = compare(yours(), reference_attention_forward(module, inputs, *maps))
                if message is None:
                    return None
                first = first or message
        return first + " (with your layers read as queries, keys, values, output in each order)"

    checks.run("shape", lambda: check_shape(yours(), inputs.shape))
    checks.run("causal", causal)
    checks.run("values", values)


def grade_get_embeddings(student, reference, checks):
    model = gpt_model(student, reference)
    sizes = GPT_SIZES
    g = generator(9)
    short = torch.randint(1, sizes["vocabulary_size"], (3, 5), generator=g)
    full = torch.randint(1, sizes["vocabulary_size"], (3, sizes["sequence_length"]), generator=g)
    with torch.no_grad():
        yours_short = once(lambda: model.get_embeddings(short))
        yours_full = once(lambda: model.get_embeddings(full))
        expected_short = reference_get_embeddings(model, short)
        expected_full = reference_get_embeddings(model, full)
    checks.run("shape", lambda: check_shape(yours_short(), expected_short.shape))
    checks.run("values", lambda: compare(yours_short(), expected_short,
                                         "the embeddings (tokens plus positions 0..T-1)")
               or compare(yours_full(), expected_full, "the embeddings of a full-length sequence"))


def grade_gpt_forward(student, reference, checks):
    model = substitute(gpt_model(student, reference), {"get_embeddings": reference_get_embeddings})
    inputs = torch.randint(1, GPT_SIZES["vocabulary_size"], (3, 6), generator=generator(10))
    with torch.no_grad():
        expected = reference_gpt_forward(model, inputs)
        yours = once(lambda: model(inputs))
    checks.run("shape", lambda: check_shape(yours(), expected.shape, "log_probas"))
    checks.run("log-probabilities", lambda: check_log_probabilities(yours()))
    checks.run("values", lambda: compare(yours(), expected, "log_probas", atol=1e-4))


def grade_gpt_loss(student, reference, checks):
    with torch.no_grad():
        grade_loss(gpt_model(student, reference), checks, scalar_check=False)


GRADERS = {
    "LSTM.forward": grade_lstm_forward,
    "LSTM.loss": grade_lstm_loss,
    "LayerNorm.forward": grade_layer_norm,
    "MultiHeadedAttention.split_heads": grade_split_heads,
    "MultiHeadedAttention.merge_heads": grade_merge_heads,
    "MultiHeadedAttention.get_attention_weights": grade_attention_weights,
    "MultiHeadedAttention.apply_attention": grade_apply_attention,
    "MultiHeadedAttention.forward": grade_attention_forward,
    "MiniGPT1.get_embeddings": grade_get_embeddings,
    "MiniGPT1.forward": grade_gpt_forward,
    "MiniGPT1.loss": grade_gpt_loss,
}


def grade(name, student, reference, student_files, check_names):
    """Run function `name`'s checks: a list of {name, passed, message} and the forbidden reason."""
    checks = Checks(student_files)
    try:
        GRADERS[name](student, reference, checks)
    except (Exception, SystemExit) as error:  # building the object failed: every check not run fails with it
        message = str(error) if isinstance(error, Mismatch) else describe_exception(error, student_files)
        if isinstance(error, ForbiddenFunctionError):
            checks.forbidden = message
        message = f"building the {name.split('.')[0]} to test: {message}"
        done = {result["name"] for result in checks.results}
        checks.results += [{"name": check, "passed": False, "message": message}
                           for check in check_names if check not in done]
    return checks.results, checks.forbidden
