"""Use a trained checkpoint: write text after a prompt, or score a text -- `python -m utils.generate`.

    python -m utils.generate --checkpoint LOG_DIR/EXP_ID/best.pt --prompt TEXT
                             [--max_new_tokens 100] [--temperature 0.8] [--top_k 40] [--top_p P]
                             [--num_samples K] [--seed S] [--device DEVICE] [--data_folder D]
    python -m utils.generate --checkpoint LOG_DIR/EXP_ID/best.pt --score TEXT_OR_FILE

Legend: B batch (the samples), T time, V vocabulary.

Both models are driven through `step(new_tokens, state)` (utils/language_model.py), so nothing here
asks which model it has. The models have no start-of-text token, so generation needs a prompt of
at least one token. The tokenizer is read from the checkpoint's recorded data folder, or
`--data_folder`, and fetched there when it is missing.
"""
import math
import os
import sys

import torch
from tqdm import tqdm

from utils.checkpoint import CheckpointError
from utils.cli import OneLineParser, UsageError, fail, one_line_warnings, resolve_device
from utils.language_model import perplexity, token_nll
from utils.models import load_checkpoint
from utils.prepare_data import fetch_tokenizer
from utils.tokenization import PADDING_ID, GPT1Tokenizer
from utils.wikitext2 import chunk_bounds

PROG = "python -m utils.generate"


# Beyond these a call is a slip of the keyboard, not a request: a billion tokens would run for days
# with nothing printed, and a billion samples would ask for a (B, V) tensor no memory holds.
MAX_NEW_TOKENS = 100_000
MAX_SAMPLES = 1_000


def check_lengths(max_new_tokens, num_samples):
    """Raise ValueError naming the flag when a length is not a whole number in its range."""
    for name, value, low, high in (("max_new_tokens", max_new_tokens, 0, MAX_NEW_TOKENS),
                                   ("num_samples", num_samples, 1, MAX_SAMPLES)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"--{name}={value!r} is invalid: expected a whole number in "
                             f"{low}..{high:,} (for more, run several times with other --seed values)")


def check_sampling(temperature, top_k=None, top_p=None):
    """Raise ValueError naming the flag when a sampling setting is out of its range."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature={temperature!r} is invalid: expected a finite number >= 0 "
                         "(0 for greedy decoding)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"--top_k={top_k!r} is invalid: expected a whole number >= 1")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"--top_p={top_p!r} is invalid: expected a number in (0, 1]")


def choose_next(log_probas, temperature=0.8, top_k=None, top_p=None, generator=None):
    """Next token ids `(B,)` from log-probabilities `(B, V)`; padding is never chosen.

        padding (id 0) -> -inf                      never sampled
        temperature 0  -> argmax                    greedy, deterministic
        otherwise      -> / temperature, keep the top_k best, keep the smallest set whose
                          probability reaches top_p, sample with the given torch.Generator
    """
    logits = log_probas.float().clone()  # (B, V)
    logits[:, PADDING_ID] = -math.inf
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        sorted_probas = sorted_logits.softmax(dim=-1)  # (B, V)
        # A token is dropped when the better tokens before it already reach top_p; the best stays.
        drop_sorted = sorted_probas.cumsum(dim=-1) - sorted_probas >= top_p  # (B, V)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # (B, V), vocabulary order
        logits = logits.masked_fill(drop, -math.inf)
    probas = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probas, 1, generator=generator).squeeze(1)  # (B,)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens=100, temperature=0.8, top_k=40, top_p=None,
             generator=None, num_samples=1, progress=False):
    """Continue `prompt_ids` `num_samples` times; returns one list of `max_new_tokens` new ids per sample.

    Parameters
    ----------
    model : a model of this package (its `step` is used; put it in eval mode).
    prompt_ids : the prompt's ids (a list of ints, at least one).
    max_new_tokens : number of tokens to add.
    temperature : 0 for greedy decoding, else the softmax temperature.
    top_k, top_p : keep the `top_k` best tokens / the nucleus of probability `top_p` (None: all).
    generator : torch.Generator on the model's device, for reproducible sampling.
    num_samples : number of continuations, sampled side by side as one batch.
    progress : show a tqdm bar on stderr.
    """
    check_sampling(temperature, top_k, top_p)
    prompt_ids = [int(index) for index in prompt_ids]
    if not prompt_ids:
        raise ValueError("the prompt is empty: give a text to continue with --prompt (the models "
                         "have no start-of-text token)")
    check_lengths(max_new_tokens, num_samples)
    device = next(model.parameters()).device
    prompt = torch.tensor(prompt_ids, device=device).expand(num_samples, -1)  # (B, T)
    log_probas, state = model.step(prompt, None)  # (B, V)
    new_tokens = []
    for position in tqdm(range(max_new_tokens), desc="generate", unit="tok", leave=False,
                         disable=not progress, file=sys.stderr):
        next_tokens = choose_next(log_probas, temperature, top_k, top_p, generator)  # (B,)
        new_tokens.append(next_tokens)
        if position + 1 < max_new_tokens:
            log_probas, state = model.step(next_tokens.unsqueeze(1), state)  # (B, V)
    if not new_tokens:
        return [[] for _ in range(num_samples)]
    return torch.stack(new_tokens, dim=1).tolist()  # (B, max_new_tokens)


@torch.no_grad()
def score(model, ids, window=None, batch_size=8):
    """How well `model` predicts `ids`: `{"loss", "ppl", "tokens"}`.

    `loss` is the mean NLL in nats of every token but the first, `ppl` its exp, `tokens` their
    number. The ids are cut as the data loader cuts a split (utils/wikitext2.py, break_mode
    "none"), into windows of `window + 1` tokens overlapping by one, each scored from an empty
    context (the LSTM from zero states) as validation does; `window` defaults to the model's
    `sequence_length` (256 for a model without one):

        ids      a b c d e f g h i j k              (window = 4)
        windows  [a b c d e] [e f g h i] [i j k]
        scored     b c d e     f g h i     j k       every token but the first, once

    so the perplexity, exp(summed NLL / number of scored tokens), is the logs' figure on the same ids.
    """
    ids = [int(index) for index in ids]
    if len(ids) < 2:
        raise ValueError(f"the text to score has {len(ids)} token(s): at least 2 are needed (the "
                         "first token is context only)")
    window = window or getattr(model, "sequence_length", None) or 256
    device = next(model.parameters()).device
    bounds = chunk_bounds(0, len(ids), window)
    nll_sum, count = 0.0, 0
    for first in range(0, len(bounds), batch_size):
        pieces = bounds[first:first + batch_size]
        source = torch.zeros(len(pieces), window, dtype=torch.long)  # (B, T)
        target = torch.zeros(len(pieces), window, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(pieces), window, dtype=torch.bool)  # (B, T)
        for row, (begin, end) in enumerate(pieces):
            chunk = torch.tensor(ids[begin:end])
            source[row, :end - begin - 1] = chunk[:-1]
            target[row, :end - begin - 1] = chunk[1:]
            mask[row, :end - begin - 1] = True
        source, target, mask = source.to(device), target.to(device), mask.to(device)
        nll = token_nll(model.predict(source), target)  # (B, T)
        nll_sum += torch.where(mask, nll, torch.zeros_like(nll)).double().sum().item()
        count += int(mask.sum())
    loss = nll_sum / count
    return {"loss": loss, "ppl": perplexity(loss), "tokens": count}


def load_tokenizer(folder):
    """The GPT-1 tokenizer of `folder`, fetching `vocab.json` and `merges.txt` there when missing
    (DataUnavailableError, saying how to get them, when they cannot be had)."""
    try:
        return GPT1Tokenizer.from_folder(folder)
    except FileNotFoundError:
        return fetch_tokenizer(folder)


def read_score_text(text_or_file):
    """The text to score: the file's contents when `text_or_file` names a file, else the text itself."""
    if os.path.isfile(text_or_file):
        try:
            with open(text_or_file, encoding="utf-8") as file:
                return file.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the text to score from {text_or_file}: {error}") from None
    return text_or_file


def encode_text(tokenizer, text):
    """Ids of a text of one or more lines, concatenated as the data concatenates its documents."""
    return [index for line in tokenizer.encode_lines(text.splitlines()) for index in line]


def _parser():
    parser = OneLineParser(prog=PROG,
                           description="Generate text with a trained checkpoint, or score a text.")
    parser.add_argument("--checkpoint", required=True, help="LOG_DIR/EXP_ID/best.pt or last.pt")
    parser.add_argument("--prompt", default=None, help="text to continue (lowercased and tokenized "
                                                       "as the training data)")
    parser.add_argument("--score", default=None, metavar="TEXT_OR_FILE",
                        help="print the perplexity per BPE token of this text (or file) instead")
    parser.add_argument("--max_new_tokens", type=int, default=100, help="tokens to add")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    parser.add_argument("--top_k", type=int, default=40, help="sample among the K best tokens")
    parser.add_argument("--top_p", type=float, default=None,
                        help="sample within the nucleus of probability P in (0, 1] (default: off)")
    parser.add_argument("--num_samples", type=int, default=1, help="continuations to write")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: random)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--data_folder", default=None,
                        help="folder with vocab.json and merges.txt (default: the checkpoint's data folder)")
    parser.add_argument("--no_progress_bar", action="store_true", help="hide the progress bar")
    return parser


def run(args):
    """Do what the parsed `args` ask.

    Raises ValueError, UsageError (DataUnavailableError among them) or CheckpointError on bad input.
    """
    if args.score is None:
        check_sampling(args.temperature, args.top_k, args.top_p)
        if args.prompt is None or not args.prompt.strip():
            raise ValueError("the prompt is empty: give a text to continue with --prompt TEXT "
                             "(or --score TEXT_OR_FILE to score a text)")
        check_lengths(args.max_new_tokens, args.num_samples)
        if args.max_new_tokens < 1:
            raise ValueError("--max_new_tokens=0 writes nothing: expected a whole number >= 1")
    device = resolve_device(args.device)
    model, config, _ = load_checkpoint(args.checkpoint, device)
    tokenizer = load_tokenizer(args.data_folder or config.data_folder)
    if tokenizer.vocabulary_size != model.vocabulary_size:
        raise ValueError(f"the tokenizer in {args.data_folder or config.data_folder} has "
                         f"{tokenizer.vocabulary_size} ids but the checkpoint's model has "
                         f"{model.vocabulary_size}; pass the --data_folder the model was trained on")

    if args.score is not None:
        ids = encode_text(tokenizer, read_score_text(args.score))
        result = score(model, ids, window=config.sequence_length)
        print(f"ppl {result['ppl']:.2f}  loss {result['loss']:.4f}  tokens {result['tokens']}  "
              f"(windows of {config.sequence_length})")
        return 0

    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError(f"the prompt {args.prompt!r} has no tokens: give a text to continue")
    generator = torch.Generator(device=device)
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    samples = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
                       args.top_p, generator, args.num_samples,
                       progress=not args.no_progress_bar and sys.stderr.isatty())
    print("\n\n".join(tokenizer.decode(prompt_ids + sample) for sample in samples))
    return 0


def main(argv=None):
    """Command-line entry point; returns the exit code (0 ok, 2 bad input)."""
    one_line_warnings()
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code
    try:
        return run(args)
    except (CheckpointError, FileNotFoundError, UsageError, ValueError) as error:
        return fail(PROG, error, 2)


if __name__ == "__main__":
    sys.exit(main())
