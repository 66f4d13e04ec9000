"""Byte and SentencePiece tokenizers."""

import numpy as np
import pytest

from data import ByteTokenizer, make_tokenizer


def test_bytes_round_trip_and_special_ids():
    tokenizer = ByteTokenizer()
    text = "héllo, wörld — ∑ 🙂\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == 384 and tokenizer.vocab_size % 128 == 0
    assert {tokenizer.end_of_document_id, tokenizer.pad_id} == {256, 257}
    assert tokenizer.decode([104, 105, 256, 257]) == "hi"


def test_sentencepiece_trained_in_workdir_on_first_use_then_reused(data_config, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i}.txt").write_text(f"the quick brown fox {i} jumps over the lazy dog. " * 20)
    data_config.source, data_config.paths = "text", str(corpus)
    data_config.validation_fraction = 0.0
    data_config.tokenizer, data_config.sentencepiece_vocab_size = "sentencepiece", 320
    workdir = tmp_path / "run"
    tokenizer = make_tokenizer(data_config, str(workdir))
    assert (workdir / "sentencepiece.model").exists()
    text = "the lazy fox jumps"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size % 128 == 0 and tokenizer.vocab_size >= 256 + 3
    again = make_tokenizer(data_config, str(workdir))  # loaded, not retrained
    assert again.name == tokenizer.name
    np.testing.assert_array_equal(again.encode(text), tokenizer.encode(text))
    data_config.sentencepiece_vocab_size = 1000  # a changed setting is not silently ignored
    with pytest.raises(ValueError, match="trained with vocab_size=320, the config asks for 1000"):
        make_tokenizer(data_config, str(workdir))
    data_config.sentencepiece_model = str(workdir / "sentencepiece.model")
    assert make_tokenizer(data_config).name == tokenizer.name


def test_sentencepiece_is_lossless_on_code(data_config, tmp_path):
    """Indentation, blank lines, runs of spaces, tabs and unseen characters survive a round
    trip, and the bytes the ids stand for add up to the text's: bits per byte count it all."""
    def source(i):
        return (f"class Thing{i}:\n    def method(self, x):\n        if x:\n            return "
                f"x  + {i}\n\n\n    value = [1,  2]\t# done\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"module{i}.py").write_text(source(i) * 5)
    data_config.update(source="text", paths=str(corpus), validation_fraction=0.0,
                       tokenizer="sentencepiece", sentencepiece_vocab_size=400)
    tokenizer = make_tokenizer(data_config, str(tmp_path / "run"))
    text = "  " + source(77) + "\r\n    ünïcode ∑ 🙂  \n\n  "
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.byte_lengths()[ids].sum() == len(text.encode("utf-8"))
    # Indentation is learnt as pieces of spaces, not one token per space.
    assert len(tokenizer.encode(" " * 12)) <= 3


def test_sentencepiece_trains_on_book_length_documents(data_config, tmp_path):
    book = "\n".join(f"line {i} of a long book with words like w{i % 97}" for i in range(3000))
    (tmp_path / "book.txt").write_text(book)  # one ~120k-character document
    data_config.update(source="text", paths=str(tmp_path / "book.txt"), validation_fraction=0.0,
                       tokenizer="sentencepiece", sentencepiece_vocab_size=400)
    tokenizer = make_tokenizer(data_config, str(tmp_path / "run"))
    assert tokenizer.decode(tokenizer.encode("line 7 of a long book")) == "line 7 of a long book"


@pytest.mark.parametrize("field,value,message", [
    ("tokenizer", "wordpiece", "data.tokenizer='wordpiece': expected one of"),
    ("sentencepiece_model", "/nonexistent/sp.model", "does not exist"),
    ("sentencepiece_vocab_size", 50, "data.sentencepiece_vocab_size=50: SentencePiece training"),
])
def test_bad_tokenizer_settings(data_config, tmp_path, field, value, message):
    (tmp_path / "doc.txt").write_text("some text to train on " * 50)
    data_config.update(source="text", paths=str(tmp_path / "doc.txt"), validation_fraction=0.0)
    if field != "tokenizer":
        data_config.tokenizer = "sentencepiece"
    data_config[field] = value
    with pytest.raises(ValueError, match=message) as error:
        make_tokenizer(data_config, str(tmp_path / "run"))
    assert "\n" not in str(error.value)


def test_a_lossy_sentencepiece_model_is_flagged_when_loaded(data_config, tmp_path, caplog):
    """A model with SentencePiece's default normalisation (as trained elsewhere, or here before
    training became lossless) loads with a warning: bits per byte would undercount."""
    import sentencepiece

    lines = [f"def function_{i}(value):\n    return value + {i}\n" for i in range(300)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "lossy"), vocab_size=300,
        minloglevel=2)
    data_config.sentencepiece_model = str(tmp_path / "lossy.model")
    data_config.tokenizer = "sentencepiece"
    with caplog.at_level("WARNING"):
        lossy = make_tokenizer(data_config)
    assert not lossy.lossless
    assert "lossy.model is lossy: decode(encode(text)) != text" in caplog.text

    caplog.clear()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "code.py").write_text("".join(lines))
    data_config.update(source="text", paths=str(corpus), validation_fraction=0.0,
                       sentencepiece_model="", sentencepiece_vocab_size=300)
    with caplog.at_level("WARNING"):
        assert make_tokenizer(data_config, str(tmp_path / "run")).lossless
    assert "lossy" not in caplog.text
