"""The course's `train` and `evaluate` (its `run_exp.py` contract) over the package's loss.

The course's notebook runs its own `main(args)` and calls `train(epoch, model, dataloader,
optimizer, args)` and `evaluate(epoch, model, dataloader, args, mode)`, each one pass over a
`DataLoader` of `Wikitext2` batches returning `(mean loss, perplexity, wall-clock seconds)`.
`run_exp.py` re-exports both. They take either model through the interface of
`utils/language_model.py` (a `BatchLoss`, as the package's own loop), so nothing here asks which
model it has, and they give the package's exact figures rather than the course script's.
"""
import time

import torch
from tqdm.auto import tqdm

from utils.cli import resolve_device
from utils.batch_loss import BatchLoss
from utils.language_model import LanguageModel, perplexity
from utils.torch_utils import to_device

# What the course's script and notebook default to when `args` lacks an attribute (the device: CUDA
# when present, which is where the course's script falls back to the CPU).
COURSE_DEFAULTS = {"device": None, "progress_bar": False, "print_every": 10}


def course_setting(args, name):
    """`args.name`, or the course's default where `args` (a Namespace, a dataclass...) lacks it."""
    value = getattr(args, name, COURSE_DEFAULTS[name])
    return COURSE_DEFAULTS[name] if value is None and name != "device" else value


def train(epoch, model, dataloader, optimizer, args):
    """One epoch of training over `dataloader`: `(mean loss, perplexity, seconds)`.

    The gradient is the course's loss (`model.loss`: each sequence's mean NLL over its real
    tokens, then the mean over sequences). The figures returned are exact: the mean loss is the
    summed NLL over every real target token trained on / their number (nats), and the perplexity
    its exp. The course's script instead averages `loss x real tokens` over batches and divides
    by `batch_size x max_length`, padding and a short last batch included, which reads low
    wherever a batch holds padding.

    `args` is the course's argparse namespace or its notebook's `Arguments`: `device`,
    `progress_bar` and `print_every` are read from it, each with the course's default when
    missing (`print_every` 0 prints nothing); `fused` (default True) picks the package's fast
    path. Batches are moved to `args.device`, where the model must already be.
    """
    return one_pass(epoch, model, dataloader, args, optimizer=optimizer, mode="train")


def evaluate(epoch, model, dataloader, args, mode="val"):
    """One pass over `dataloader` in eval mode, without gradients: `(mean loss, perplexity, seconds)`.

    The figures are exact as in `train` (summed NLL over the real target tokens / their number);
    `mode` ("val", "test") only labels the printed lines. `args` as in `train`.
    """
    with torch.no_grad():
        return one_pass(epoch, model, dataloader, args, optimizer=None, mode=mode)


def one_pass(epoch, model, dataloader, args, *, optimizer, mode):
    if not isinstance(model, LanguageModel):
        raise TypeError(f"model of type {type(model).__name__} lacks the package's interface "
                        "(utils/language_model.py): build it from lstm_solution.LSTM or "
                        "gpt1_solution.MiniGPT1")
    device = course_setting(args, "device")
    device = resolve_device(None if device is None else str(device))  # a str or a torch.device
    print_every = course_setting(args, "print_every")
    label = mode.upper()
    batch_loss = BatchLoss(model, fused=getattr(args, "fused", True))
    batch_loss.train(optimizer is not None)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    started = time.perf_counter()
    bar = tqdm(dataloader, desc=f"{label} epoch {epoch}", disable=not course_setting(args, "progress_bar"),
               dynamic_ncols=True, leave=False)
    for index, batch in enumerate(bar):
        batch = to_device(batch, device)
        sequences = int((batch["mask"].sum(dim=1) > 0).sum())
        loss, batch_nll, batch_tokens = batch_loss(batch["source"], batch["target"], batch["mask"],
                                                   1.0 / max(sequences, 1))
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        nll_sum += batch_nll
        tokens += batch_tokens
        if print_every and index % print_every == 0:  # .item() waits for the device: only then
            tqdm.write(f"[{label}] epoch {epoch}, step {index}: loss {loss.item():.5f}")
    bar.close()
    if float(tokens) == 0:
        raise ValueError(f"the {label.lower()} dataloader gave no batch with a real target token "
                         f"in epoch {epoch}: check that its dataset is not empty")
    mean_loss = float(nll_sum) / float(tokens)
    seconds = time.perf_counter() - started
    ppl = perplexity(mean_loss)
    if print_every:
        tqdm.write(f"== [{label}] epoch {epoch}: perplexity {ppl:.3f} ({seconds:.1f} s)")
    return mean_loss, ppl, seconds
