import json
import os

import numpy
import pytest
from data_helpers import CORPUS_DIR, read_documents, tiny_tokenizer_model, write_jsonl

from megatron_longgen.data.blend import load_blend
from megatron_longgen.data.preprocess import (
    DataError,
    PreprocessConfig,
    histogram_of,
    output_paths,
    preprocess,
)
from megatron_longgen.data.tokenizer import TokenizerError, build_tokenizer
from megatron_longgen.utils.cli import run_main

DOCS = [
    "The sky is blue. Here we go.",
    "Line one\nline two with  two spaces\n\nand a paragraph break.",
    "Numbers 12345 and unicode café 🙂.",
    "   ",  # whitespace only: skipped
    "A longer document. " * 40,
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tiny_tokenizer_model())


def _cfg(inputs, out, **kw):
    kw.setdefault("progress", False)
    return PreprocessConfig(inputs=inputs, output_prefix=str(out), tokenizer_model=tiny_tokenizer_model(), **kw)


def test_round_trip_and_counts(tok, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    report = preprocess(_cfg([("books", src)], tmp_path / "out" / "c"))
    prefix = output_paths(str(tmp_path / "out" / "c"), "books")["base"]
    docs = read_documents(prefix)
    expected = [d.strip() for d in DOCS if d.strip()]
    assert len(docs) == len(expected) == report.sources[0].documents
    for ids, text in zip(docs, expected):
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1]) == text
    assert report.sources[0].skipped_empty == 1
    # The reported counts are what the .idx holds, in the report and in the stats file.
    idx_tokens = sum(len(d) for d in docs)
    assert report.total_tokens == report.sources[0].tokens == idx_tokens
    stats = json.load(open(report.stats_path))
    assert stats["total_tokens"] == idx_tokens
    assert stats["sources"][0]["histogram"] == histogram_of([len(d) for d in docs])
    assert sum(stats["histogram"].values()) == len(docs)
    # No temporary files remain.
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp-" in f]


def test_no_bos_no_eod(tok, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:1])
    preprocess(_cfg([("s", src)], tmp_path / "c", prepend_bos=False, append_eod=False))
    assert read_documents(output_paths(str(tmp_path / "c"), "s")["base"]) == [tok.encode(DOCS[0])]


def test_plain_text_modes(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("First block.\nsame block.\n\n  \nSecond block.\n\n\nThird.\n", encoding="utf-8")
    r_par = preprocess(_cfg([("t", str(txt))], tmp_path / "p", text_document="paragraph"))
    r_file = preprocess(_cfg([("t", str(txt))], tmp_path / "f", text_document="file"))
    assert r_par.sources[0].documents == 3
    assert r_file.sources[0].documents == 1


def test_histogram_buckets():
    assert histogram_of([1, 2, 3, 4, 7, 8, 1023, 1024, 40000]) == {
        "1": 1, "2": 2, "4": 2, "8": 1, "512": 1, "1024": 1, "32768": 1,
    }


def test_multi_source_blend(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["alpha text " * 20] * 6)
    b = write_jsonl(tmp_path / "b.jsonl", ["beta words " * 5] * 3)
    c = write_jsonl(tmp_path / "c.jsonl", ["gamma " * 8] * 2)
    report = preprocess(_cfg([("a", a), ("b", b), ("b", c)], tmp_path / "o" / "mix", workers=2))
    prefixes, weights = load_blend(report.blend_path)
    assert [os.path.basename(p) for p in prefixes] == ["mix_a_document", "mix_b_document"]
    for p in prefixes:
        assert os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")
    tokens = [sum(map(len, read_documents(p))) for p in prefixes]
    assert report.sources[1].documents == 5  # both files of source b
    numpy.testing.assert_allclose(weights, numpy.array(tokens) / sum(tokens))
    # Source weights multiply the natural share.
    report2 = preprocess(_cfg([("a", a), ("b", b)], tmp_path / "o2" / "mix", source_weights={"b": 4.0}))
    ta, tb = report2.sources[0].tokens, report2.sources[1].tokens
    numpy.testing.assert_allclose(report2.weights, numpy.array([ta, 4 * tb]) / (ta + 4 * tb))


def test_long_document_upsampling(tmp_path):
    docs = ["short one."] * 10 + ["long document text " * 60] * 2
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    plain = preprocess(_cfg([("s", src)], tmp_path / "plain" / "c"))
    threshold = 100
    up = preprocess(_cfg([("s", src)], tmp_path / "up" / "c", upsample_long_min_tokens=threshold, upsample_factor=3))
    paths = output_paths(str(tmp_path / "up" / "c"), "s")
    base, long = read_documents(paths["base"]), read_documents(paths["long"])
    assert len(base) == 10 and len(long) == 2
    assert max(map(len, base)) < threshold <= min(map(len, long))
    assert up.sources[0].tokens == plain.sources[0].tokens  # nothing duplicated on disk
    base_tokens, long_tokens = sum(map(len, base)), sum(map(len, long))
    assert up.sources[0].long_tokens == long_tokens
    w_base, w_long = up.weights
    assert w_long / w_base == pytest.approx(3 * long_tokens / base_tokens)
    # Without long documents, no long subset is written or blended.
    none_long = preprocess(_cfg([("s", src)], tmp_path / "n" / "c", upsample_long_min_tokens=10**6, upsample_factor=3))
    assert none_long.prefixes == [output_paths(str(tmp_path / "n" / "c"), "s")["base"]]
    assert not os.path.exists(output_paths(str(tmp_path / "n" / "c"), "s")["long"] + ".bin")


def _bad_inputs(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["fine document"] * 50)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "ok"}\n{"body": "no text here"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": "broken\n')
    return good, {
        "missing_field": (str(missing), r"missing\.jsonl:2: missing field 'text'"),
        "empty_file": (str(empty), r"empty\.jsonl: empty file"),
        "bad_json": (str(bad_json), r"bad\.jsonl:4: bad JSON line"),
        "no_such_file": (str(tmp_path / "absent.jsonl"), r"absent\.jsonl' does not exist"),
    }


@pytest.mark.parametrize("case", ["missing_field", "empty_file", "bad_json", "no_such_file"])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_leaves_nothing(tmp_path, case, workers):
    good, cases = _bad_inputs(tmp_path)
    path, message = cases[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # The good source comes first, so its files were being written when the error hits.
    with pytest.raises(DataError, match=message):
        preprocess(_cfg([("good", good), ("bad", path)], out_dir / "c", workers=workers))
    assert os.listdir(out_dir) == []


def test_bad_tokenizer_leaves_nothing(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ["x"])
    out = tmp_path / "new_dir" / "c"
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        preprocess(_cfg([("s", src)], out, tokenizer_type="WordPiece"))
    cfg = _cfg([("s", src)], out)
    cfg.tokenizer_model = str(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="does not exist"):
        preprocess(cfg)
    assert not os.path.exists(tmp_path / "new_dir")


def test_failed_run_keeps_previous_outputs(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ["first version"])
    preprocess(_cfg([("s", src)], tmp_path / "c"))
    prefix = output_paths(str(tmp_path / "c"), "s")["base"]
    before = read_documents(prefix)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "new"}\nnot json\n')
    with pytest.raises(DataError):
        preprocess(_cfg([("s", str(bad))], tmp_path / "c"))
    assert read_documents(prefix) == before


def test_cli(tmp_path, capsys):
    from tool_modules import load_tool

    main = load_tool("preprocess_data").main
    out = tmp_path / "cli" / "c"
    rc = main([
        "--input", f"stories={os.path.join(CORPUS_DIR, 'stories.jsonl')}",
        "--input", f"essays={os.path.join(CORPUS_DIR, 'essays.txt')}", "--text-document", "paragraph",
        "--output-prefix", str(out), "--tokenizer-model", tiny_tokenizer_model(),
        "--upsample-long-min-tokens", "2048", "--upsample-factor", "3", "--workers", "2",
    ])
    captured = capsys.readouterr()
    assert rc == 0
    assert "document length histogram" in captured.out and "[stories]" in captured.err
    prefixes, weights = load_blend(str(out) + "_blend.json")
    assert len(prefixes) == 3 and sum(weights) == pytest.approx(1.0)
    rc = run_main(main, ["--input", f"x={tmp_path / 'nope.jsonl'}", "--output-prefix", str(out),
                         "--tokenizer-model", tiny_tokenizer_model()])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "nope.jsonl' does not exist" in err


def test_output_prefix_under_a_file_or_ending_in_a_separator_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ["x"])
    (tmp_path / "tok").write_text("a file")
    with pytest.raises(DataError, match=r"--output-prefix: .*tok is a file, not a directory"):
        preprocess(_cfg([("s", src)], tmp_path / "tok" / "corpus"))
    with pytest.raises(DataError, match=r"cannot be created: .*tok is a file"):
        preprocess(_cfg([("s", src)], tmp_path / "tok" / "deeper" / "corpus"))
    with pytest.raises(DataError, match="ends in a directory separator"):
        preprocess(_cfg([("s", src)], str(tmp_path / "out") + os.sep))
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "tok"]


def test_ctrl_c_exits_1_with_one_line_and_no_partial_output(tmp_path):
    """Ctrl-C reaches the whole process group (workers too), as from a terminal."""
    import signal
    import subprocess
    import sys
    import time

    from data_helpers import REPO

    big = write_jsonl(tmp_path / "big_00.jsonl", ["A longer document about nothing. " * 200] * 4000)
    for i in range(1, 20):  # about a minute of work uninterrupted: it cannot end before the signal
        os.link(big, tmp_path / f"big_{i:02d}.jsonl")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", f"big={tmp_path / 'big_*.jsonl'}",
         "--output-prefix", str(out / "c"), "--tokenizer-model", tiny_tokenizer_model(), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
        # as from a terminal: a suite started in the background inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out.is_dir() and any(".tmp-" in f for f in os.listdir(out))):  # writing has begun
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the interrupt"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert not out.exists()  # the folder the run created is gone again, with every temporary
