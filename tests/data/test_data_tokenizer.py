import pytest
from data_helpers import tiny_tokenizer_model

from megatron_longgen.data.tokenizer import TokenizerError, build_tokenizer

TEXTS = [
    "The sky is blue.",
    "  leading spaces, double  spaces and a trailing one ",
    "line one\nline two\n\n\ttabbed",
    "digits 0123456789 and 3.14159",
    "unicode: café, naïve, Ελληνικά, 日本語, emoji 🙂",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tiny_tokenizer_model())


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_ids_and_framing(tok):
    assert tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)  # Llama's layout, no pad piece
    assert tok.eod == tok.eos == 2 and tok.bos == 1 and tok.pad == -1
    ids = tok.encode_document("Here we go.")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids[1:-1] == tok.encode("Here we go.")
    assert tok.encode_document("x", prepend_bos=False, append_eod=False) == tok.encode("x")


def test_usable_as_megatron_dataset_tokenizer(tok):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    cfg = GPTDatasetConfig(
        random_seed=1, sequence_length=8, tokenizer=tok,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
    )
    assert cfg.token_dtype_code == 8  # uint16 tokens for a 512-piece vocabulary
    assert tok.unique_identifiers["tokenizer_path"].endswith("tiny.model")


def _save_tiny_hf_tokenizer(directory):
    """A byte-level BPE trained in memory and saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(TEXTS * 10, trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(str(directory))


def test_huggingface_directory(tmp_path):
    _save_tiny_hf_tokenizer(tmp_path / "hf")
    hf = build_tokenizer(str(tmp_path / "hf"))  # a directory means Hugging Face
    assert type(hf).__name__ == "HuggingFaceTokenizer"
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (1, 2, -1)
    for text in TEXTS:
        ids = hf.encode(text)
        assert hf.bos_id not in ids and hf.eos_id not in ids  # no special tokens added
        assert hf.decode(ids) == text
    doc = hf.encode_document(TEXTS[0])
    assert doc[0] == 1 and doc[-1] == 2


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        build_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(TokenizerError, match="unknown tokenizer type 'GPT2BPE'"):
        build_tokenizer(tiny_tokenizer_model(), "GPT2BPE")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="cannot load SentencePiece model"):
        build_tokenizer(str(junk))
