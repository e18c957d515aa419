"""Time the GPT-1 tokenizer on a WikiText-2-sized text: `python -m utils.bench_tokenizer`.

    python -m utils.bench_tokenizer [TEXT(.xz)] [--tokenizer_folder FOLDER]

Defaults: $SHARED_DATA_DIR/wikitext-2-tokens/train.txt.xz (WikiText-2's training text) and the
tokenizer files in $SHARED_DATA_DIR/gpt1-bpe. Every non-empty line is encoded as one document,
as `prepare_data` does; the time to read the file is reported apart from the encoding time.
"""
import lzma
import os
import sys
import time

from utils.cli import SHARED_DATA_ENV, OneLineParser, fail, shared_data_path
from utils.prepare_data import document_lines, tokenize_documents
from utils.tokenization import GPT1Tokenizer

PROG = "python -m utils.bench_tokenizer"
DEFAULT_TEXT = os.path.join("wikitext-2-tokens", "train.txt.xz")  # under $SHARED_DATA_DIR
DEFAULT_TOKENIZER_FOLDER = "gpt1-bpe"  # under $SHARED_DATA_DIR


def read_text(path):
    """Text of a UTF-8 file, xz-compressed if its name ends in .xz."""
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as file:
        return file.read()


def benchmark(text_path, tokenizer_folder):
    """{"documents", "tokens", "read_s", "tokenize_s", "tokenize_cpu_s"} of tokenizing `text_path`.

    CPU time (all threads) is reported too: on a shared machine the wall time depends on the load.
    """
    tokenizer = GPT1Tokenizer.from_folder(tokenizer_folder)
    start = time.perf_counter()
    documents = document_lines(read_text(text_path))
    read_s = time.perf_counter() - start
    start, start_cpu = time.perf_counter(), time.process_time()
    arrays = tokenize_documents(tokenizer, documents)
    tokenize_s, tokenize_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    return {"documents": len(documents), "tokens": int(arrays["tokens"].size), "read_s": read_s,
            "tokenize_s": tokenize_s, "tokenize_cpu_s": tokenize_cpu_s}


def _parser():
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("text", nargs="?", default=None,
                        help=f"the text to tokenize (default: ${SHARED_DATA_ENV}/{DEFAULT_TEXT})")
    parser.add_argument("--tokenizer_folder", default=None,
                        help="folder with vocab.json and merges.txt "
                             f"(default: ${SHARED_DATA_ENV}/{DEFAULT_TOKENIZER_FOLDER})")
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    args.text = args.text or shared_data_path(DEFAULT_TEXT)
    args.tokenizer_folder = args.tokenizer_folder or shared_data_path(DEFAULT_TOKENIZER_FOLDER)
    missing = [name for name, value in (("TEXT", args.text), ("--tokenizer_folder", args.tokenizer_folder))
               if value is None]
    if missing:
        parser.error(f"{' and '.join(missing)} not given and ${SHARED_DATA_ENV} is not set: give "
                     f"{' and '.join(missing)}, or set {SHARED_DATA_ENV} to the shared data folder")
    try:
        result = benchmark(args.text, args.tokenizer_folder)
    except (OSError, ValueError) as error:
        return fail(PROG, error, 2)
    print(f"{args.text}: {result['documents']:,} documents, {result['tokens']:,} tokens; "
          f"read in {result['read_s']:.2f} s, tokenized in {result['tokenize_s']:.2f} s "
          f"({result['tokenize_cpu_s']:.2f} s CPU; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
