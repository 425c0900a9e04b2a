"""Tokenize named text sources into Megatron-Core indexed datasets and a blend file.

Example:
    python tools/preprocess_data.py \
        --input books=data/books.jsonl --input code='data/code/*.txt' \
        --output-prefix data/tok/corpus \
        --tokenizer-model /models/llama/tokenizer.model \
        --upsample-long-min-tokens 32768 --upsample-factor 3 --workers 8

See docs/data.md for the formats and the mixture semantics.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longgen.utils.accelerators import quiet_fallback_warnings  # noqa: E402

quiet_fallback_warnings()  # before Megatron-Core is imported

from megatron_longgen.data.preprocess import PreprocessConfig, format_report, preprocess  # noqa: E402
from megatron_longgen.data.tokenizer import TOKENIZER_TYPES  # noqa: E402
from megatron_longgen.utils.cli import fail, run_main  # noqa: E402


def _name_value(text: str, what: str):
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME={what}, got {text!r}")
    return name, value


def _source_weight(text: str):
    name, value = _name_value(text, "WEIGHT")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"weight of {name!r} is not a number: {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input")
    g.add_argument("--input", action="append", required=True, metavar="NAME=PATH",
                   type=lambda s: _name_value(s, "PATH"),
                   help="a named source: a .jsonl/.json file, a plain-text file or a quoted glob; "
                        "repeat for more sources (or more files of one source)")
    g.add_argument("--json-key", default="text", help="JSONL field holding the document (default: text)")
    g.add_argument("--text-document", choices=("file", "paragraph"), default="file",
                   help="plain text: one document per file, or per blank-line-separated block")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", required=True,
                   help="a SentencePiece model file, or a local Hugging Face tokenizer directory")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="default: SentencePieceTokenizer for a file, HuggingFaceTokenizer for a directory")
    g.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append EOS to every document (default: on)")
    g.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=True,
                   help="prepend BOS to every document, as Llama does (default: on)")
    g = p.add_argument_group("output and mixture")
    g.add_argument("--output-prefix", required=True, help="path prefix of all outputs")
    g.add_argument("--upsample-long-min-tokens", type=int, default=None,
                   help="documents at least this long (tokens, BOS/EOS included) are 'long'")
    g.add_argument("--upsample-factor", type=float, default=1.0,
                   help="sampling weight of long documents relative to their source's others")
    g.add_argument("--source-weight", action="append", default=[], metavar="NAME=WEIGHT", type=_source_weight,
                   help="multiply a source's natural (token-proportional) weight")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--chunk-size", type=int, default=16, help="documents per worker task")
    g.add_argument("--quiet", action="store_true", help="no progress line and no report on stdout")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    weights = dict(args.source_weight)
    if len(weights) != len(args.source_weight):
        fail("a source weight is given twice (--source-weight)")
    cfg = PreprocessConfig(
        inputs=list(args.input),
        output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model,
        tokenizer_type=args.tokenizer_type,
        json_key=args.json_key,
        text_document=args.text_document,
        prepend_bos=args.prepend_bos,
        append_eod=args.append_eod,
        workers=args.workers,
        chunk_size=args.chunk_size,
        upsample_long_min_tokens=args.upsample_long_min_tokens,
        upsample_factor=args.upsample_factor,
        source_weights=weights,
        progress=not args.quiet,
    )
    report = preprocess(cfg)
    if not args.quiet:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
