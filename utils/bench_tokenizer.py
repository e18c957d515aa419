"""Time the GPT-1 tokenizer on a WikiText-2-sized text: `python -m utils.bench_tokenizer`.

    python -m utils.bench_tokenizer [TEXT(.xz)] [--tokenizer_folder FOLDER]

Defaults: $SHARED_DATA_DIR/wikitext-2-tokens/train.txt.xz (2.09M words, 36,718 lines) and the
tokenizer files in $SHARED_DATA_DIR/gpt1-bpe. Every non-empty line is encoded as one document,
as `prepare_data` does; the time to read the file is reported apart from the encoding time.
"""
import argparse
import lzma
import os
import sys
import time

from utils.prepare_data import _document_lines, tokenize_documents
from utils.tokenization import GPT1Tokenizer

SHARED_DATA_DIR = os.environ.get("SHARED_DATA_DIR", os.path.join("..", "shared", "data"))


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
    documents = _document_lines(read_text(text_path))
    read_s = time.perf_counter() - start
    start, start_cpu = time.perf_counter(), time.process_time()
    arrays = tokenize_documents(tokenizer, documents)
    tokenize_s, tokenize_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    return {"documents": len(documents), "tokens": int(arrays["tokens"].size), "read_s": read_s,
            "tokenize_s": tokenize_s, "tokenize_cpu_s": tokenize_cpu_s}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m utils.bench_tokenizer",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("text", nargs="?",
                        default=os.path.join(SHARED_DATA_DIR, "wikitext-2-tokens", "train.txt.xz"))
    parser.add_argument("--tokenizer_folder", default=os.path.join(SHARED_DATA_DIR, "gpt1-bpe"))
    args = parser.parse_args(argv)
    try:
        result = benchmark(args.text, args.tokenizer_folder)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.text}: {result['documents']:,} documents, {result['tokens']:,} tokens; "
          f"read in {result['read_s']:.2f} s, tokenized in {result['tokenize_s']:.2f} s "
          f"({result['tokenize_cpu_s']:.2f} s CPU; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
