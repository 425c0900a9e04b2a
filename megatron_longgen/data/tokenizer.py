"""One small tokenizer interface over SentencePiece and Hugging Face tokenizers.

`Tokenizer` subclasses Megatron-Core's `MegatronTokenizerBase`, so the same object is used by
the preprocessing tool, by `GPTDatasetConfig(tokenizer=...)` (which reads `vocab_size`, `eod`
and `pad`) and by evaluation code (`encode` / `decode`).
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_longgen.utils.cli import UsageError

# Megatron's names first; the short aliases are accepted too.
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "Llama2Tokenizer", "sentencepiece")
HUGGINGFACE_TYPES = ("HuggingFaceTokenizer", "huggingface", "hf")
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + HUGGINGFACE_TYPES

# Megatron's dataset code treats -1 as "no pad token" (it never occurs in the data).
NO_PAD_ID = -1


class TokenizerError(UsageError):
    """The tokenizer could not be found, loaded or is of an unknown type."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What is needed to rebuild a tokenizer (picklable, so worker processes can load their own)."""

    tokenizer_model: str
    tokenizer_type: Optional[str] = None

    def build(self) -> "Tokenizer":
        return build_tokenizer(self.tokenizer_model, self.tokenizer_type)


class Tokenizer(MegatronTokenizerBase):
    """encode / decode / vocab_size / bos_id / eos_id / pad_id, plus Megatron's eod / pad names.

    `encode` never adds special tokens: document framing (BOS ... EOS) is the caller's choice.
    """

    def __init__(self, path: str, library: str) -> None:
        super().__init__(path, {"library": library})

    # --- the small interface -----------------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def bos_id(self) -> int:
        raise NotImplementedError

    @property
    def eos_id(self) -> int:
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """The pad id, or -1 when the tokenizer has none (as Llama's SentencePiece model)."""
        raise NotImplementedError

    def encode_document(self, text: str, prepend_bos: bool = True, append_eod: bool = True) -> List[int]:
        """Tokens of one training document, framed the way Llama sees documents."""
        ids = self.encode(text)
        if prepend_bos:
            ids = [self.bos_id] + ids
        if append_eod:
            ids = ids + [self.eos_id]
        return ids

    # --- MegatronTokenizerBase / Megatron dataset names --------------------------------------
    def tokenize(self, text: str) -> List[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("chat templates are not used for pretraining data")

    @property
    def eod(self) -> int:
        return self.eos_id

    @property
    def eos(self) -> int:
        return self.eos_id

    @property
    def bos(self) -> int:
        return self.bos_id

    @property
    def pad(self) -> int:
        return self.pad_id

    @property
    def unique_identifiers(self) -> OrderedDict:
        # Megatron hashes these into its dataset cache keys.
        ids = OrderedDict()
        ids["class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        ids["tokenizer_path"] = os.path.abspath(self.path)
        return ids


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file, e.g. Llama's `tokenizer.model`."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        super().__init__(model_file, "sentencepiece")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(model_file)
        except Exception as exc:  # sentencepiece raises OSError or RuntimeError
            raise TokenizerError(f"cannot load SentencePiece model {model_file!r}: {exc}") from exc

    def encode(self, text: str) -> List[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()  # -1 when the model has no pad piece

    def vocab(self):
        return {self._sp.IdToPiece(i): i for i in range(self.vocab_size)}


class HuggingFaceTokenizer(Tokenizer):
    """A local directory holding Hugging Face tokenizer files (never downloads)."""

    def __init__(self, directory: str) -> None:
        from transformers import AutoTokenizer

        super().__init__(directory, "huggingface")
        try:
            self._tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as exc:
            raise TokenizerError(f"cannot load Hugging Face tokenizer from {directory!r}: {exc}") from exc
        if self._tok.eos_token_id is None:
            raise TokenizerError(f"Hugging Face tokenizer {directory!r} has no EOS token")

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return len(self._tok)  # includes added tokens, unlike `.vocab_size`

    @property
    def bos_id(self) -> int:
        bos = self._tok.bos_token_id
        return self.eos_id if bos is None else bos  # GPT-2 style tokenizers reuse EOS

    @property
    def eos_id(self) -> int:
        return self._tok.eos_token_id

    @property
    def pad_id(self) -> int:
        pad = self._tok.pad_token_id
        return NO_PAD_ID if pad is None else pad

    def vocab(self):
        return self._tok.get_vocab()


def build_tokenizer(tokenizer_model: str, tokenizer_type: Optional[str] = None) -> Tokenizer:
    """Load a tokenizer; the type is inferred when not given (file: SentencePiece, dir: HF)."""
    if not tokenizer_model:
        raise TokenizerError("no tokenizer given (--tokenizer-model)")
    if not os.path.exists(tokenizer_model):
        raise TokenizerError(f"tokenizer {tokenizer_model!r} does not exist")
    if tokenizer_type is None:
        tokenizer_type = "HuggingFaceTokenizer" if os.path.isdir(tokenizer_model) else "SentencePieceTokenizer"
    if tokenizer_type in SENTENCEPIECE_TYPES:
        if os.path.isdir(tokenizer_model):
            tokenizer_model = os.path.join(tokenizer_model, "tokenizer.model")
            if not os.path.isfile(tokenizer_model):
                raise TokenizerError(f"no tokenizer.model in directory {os.path.dirname(tokenizer_model)!r}")
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type in HUGGINGFACE_TYPES:
        return HuggingFaceTokenizer(tokenizer_model)
    raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def train_sentencepiece(
    input_files: Iterable[str],
    model_prefix: str,
    vocab_size: int = 512,
    model_type: str = "bpe",
    json_key: str = "text",
    seed_sentences: int = 200_000,
) -> str:
    """Train a small SentencePiece model from local text files; returns the `.model` path.

    `.jsonl` / `.json` inputs contribute the `json_key` field of each line; other files are read
    as plain text.

    The settings follow Llama's tokenizer (BOS=1, EOS=2, UNK=0, no pad, identity normalisation,
    split digits, byte fallback), so any text round-trips exactly through encode / decode.
    """
    import sentencepiece

    input_files = [os.fspath(p) for p in input_files]
    if not input_files:
        raise ValueError("train_sentencepiece needs at least one input file")
    for path in input_files:
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise ValueError(f"tokenizer training file {path!r} is missing or empty")
    if vocab_size < 256 + 3 + 1:
        raise ValueError("vocab_size must exceed 259: byte fallback alone needs 256 + 3 special pieces")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text_files = [_as_plain_text(p, json_key, tmp, i) for i, p in enumerate(input_files)]
        _train(sentencepiece, text_files, model_prefix, vocab_size, model_type, seed_sentences)
    return model_prefix + ".model"


def _as_plain_text(path: str, json_key: str, tmp_dir: str, index: int) -> str:
    """SentencePiece trains on plain text: extract the documents of a JSONL file."""
    if not path.endswith((".jsonl", ".json")):
        return path
    from megatron_longgen.data.preprocess import iter_documents

    out = os.path.join(tmp_dir, f"input{index}.txt")
    with open(out, "w", encoding="utf-8") as f:
        for doc in iter_documents(path, json_key):
            if doc:
                f.write(doc + "\n")
    return out


def _train(sentencepiece, input_files, model_prefix, vocab_size, model_type, seed_sentences) -> None:
    sentencepiece.SentencePieceTrainer.train(
        input=",".join(input_files),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=1 << 16,
        input_sentence_size=seed_sentences,
        shuffle_input_sentence=True,
        num_threads=1,  # deterministic model for a given input
        minloglevel=2,
    )


def main(argv=None) -> None:
    """`python -m megatron_longgen.data.tokenizer --input a.txt --model-prefix out/tok --vocab-size 512`."""
    import argparse

    p = argparse.ArgumentParser(description="Train a small SentencePiece model from local text files.")
    p.add_argument("--input", action="append", required=True, help="a plain-text training file (repeatable)")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--json-key", default="text", help="field read from .jsonl inputs")
    args = p.parse_args(argv)
    path = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type, args.json_key)
    print(path)


if __name__ == "__main__":
    main()
