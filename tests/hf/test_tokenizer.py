"""hf/tokenizer.py: our tokenizers exported as Hugging Face tokenizer files, checked against
transformers' ``AutoTokenizer`` (the independent reference), and Hugging Face folders read back
as our `Tokenizer`."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from configs.data import get_config
from data import make_tokenizer
from data.sources import read_documents
from data.tokenizers import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from hf.tokenizer import TOKENIZER_FILES, HuggingFaceTokenizer, export_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A leading space, tabs, runs of spaces, blank lines, "\r\n", a no-break space, non-ASCII, emoji and characters
# a small model never saw (byte fallback), and special tokens' strings, which are text.
TRICKY = (" \tdef f(x):\n\t\treturn  x   +\u00a0y  # ünïcode ∑ — 日本語 🙂🦜\r\n\n    "
          "s = '<0x41> </s> <pad> <unk> <|endoftext|>'   \n\n\n  ")


@pytest.fixture(scope="module")
def validation_texts():
    """The stdlib source's validation documents (about 240 KB) and `TRICKY`."""
    return [*read_documents(get_config(), "validation"), TRICKY]


@pytest.fixture(scope="module")
def sentencepiece_path(tmp_path_factory):
    """A model trained here (data.tokenizers.train_sentencepiece) on 300 KB of the stdlib."""
    path = str(tmp_path_factory.mktemp("sentencepiece") / "sentencepiece.model")
    train_sentencepiece(read_documents(get_config(), "train"), path, vocab_size=1024,
                        max_characters=300_000)
    return path


@pytest.fixture(params=["bytes", "sentencepiece"])
def ours(request, sentencepiece_path):
    if request.param == "bytes":
        return ByteTokenizer()
    return SentencePieceTokenizer(sentencepiece_path)


def exported(tokenizer, directory) -> str:
    os.makedirs(directory, exist_ok=True)
    export_tokenizer(tokenizer, str(directory), model_max_length=4096)
    return str(directory)


def check_same_ids(tokenizer, ours, theirs):
    """``theirs`` (the tokenizers library's unigram search, summing scores in float64) are
    ``ours``, except, for SentencePiece, where SentencePiece's own search cannot tell two
    spellings of the same text apart: it sums the scores in float32 as it goes, so paths
    within the running sum's float32 resolution (the same pieces in another order, as runs
    of spaces; or on a long text two paths 0.0003 apart) are decided by rounding. Every
    stretch where they differ must be such a tie."""
    ours, theirs = list(map(int, ours)), list(map(int, theirs))
    if ours == theirs:
        return
    assert isinstance(tokenizer, SentencePieceTokenizer), "byte ids differ"
    lengths = tokenizer.byte_lengths()
    score = tokenizer.processor.get_score
    assert lengths[ours].sum() == lengths[theirs].sum()
    i = j = at_i = at_j = 0
    while i < len(ours):
        if at_i == at_j and ours[i] == theirs[j]:
            at_i, at_j, i, j = at_i + lengths[ours[i]], at_j + lengths[theirs[j]], i + 1, j + 1
            continue
        start_i, start_j = i, j  # a stretch where they differ, up to where both meet again
        while True:
            if at_i <= at_j:
                at_i, i = at_i + lengths[ours[i]], i + 1
            else:
                at_j, j = at_j + lengths[theirs[j]], j + 1
            if at_i == at_j:
                break
        ours_score = sum(score(k) for k in ours[start_i:i])
        theirs_score = sum(score(k) for k in theirs[start_j:j])
        running = abs(sum(score(k) for k in ours[:i]))
        assert abs(ours_score - theirs_score) <= 2 * np.spacing(np.float32(running)), (
            [tokenizer.processor.id_to_piece(k) for k in ours[start_i:i]],
            [tokenizer.processor.id_to_piece(k) for k in theirs[start_j:j]])


def test_transformers_gives_our_ids_from_the_exported_files(ours, validation_texts, tmp_path):
    reference = AutoTokenizer.from_pretrained(exported(ours, tmp_path))
    assert reference.eos_token_id == ours.end_of_document_id
    assert reference.pad_token_id == ours.pad_id
    assert reference.bos_token is None and reference.model_max_length == 4096
    for text in validation_texts:
        # add_special_tokens=True, the default: still no BOS (nor EOS) added.
        theirs = reference(text, add_special_tokens=True)["input_ids"]
        check_same_ids(ours, ours.encode(text), theirs)
        assert reference.decode(theirs, skip_special_tokens=True) == text
    ids = ours.encode(TRICKY)
    check_same_ids(ours, ids, reference(TRICKY)["input_ids"])
    assert reference.decode([*ids, ours.end_of_document_id, ours.pad_id],
                            skip_special_tokens=True) == TRICKY
    if isinstance(ours, SentencePieceTokenizer):
        assert any(ours.processor.is_byte(int(i)) for i in ids)  # byte fallback was used
        assert reference.unk_token_id == ours.processor.unk_id()
        # A literal "▁" is SentencePiece's space symbol, as in SentencePiece itself.
        check_same_ids(ours, ours.encode("a ▁b▁"), reference("a ▁b▁")["input_ids"])


def test_export_needs_neither_transformers_nor_torch(sentencepiece_path, tmp_path):
    script = f"""
import sys
from data.tokenizers import ByteTokenizer, SentencePieceTokenizer
from hf.tokenizer import export_tokenizer
export_tokenizer(ByteTokenizer(), {str(tmp_path)!r}, 128)
export_tokenizer(SentencePieceTokenizer({sentencepiece_path!r}), {str(tmp_path)!r}, 128)
loaded = sorted(name for name in ("transformers", "torch") if name in sys.modules)
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)
    assert sorted(os.listdir(tmp_path)) == sorted(TOKENIZER_FILES)
    with open(tmp_path / "tokenizer_config.json") as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["eos_token"], config["pad_token"], config["unk_token"]) == ("</s>", "<pad>",
                                                                              "<unk>")
    assert not config["add_bos_token"] and not config["add_eos_token"]
    assert "bos_token" not in config and config["model_max_length"] == 128


def test_hugging_face_tokenizer_reads_an_exported_folder(ours, validation_texts, tmp_path):
    directory = exported(ours, tmp_path / "model")
    tokenizer = HuggingFaceTokenizer(directory)
    reference = AutoTokenizer.from_pretrained(directory)
    for text in validation_texts:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32
        assert ids.tolist() == reference(text)["input_ids"]
        check_same_ids(ours, ours.encode(text), ids)
    check_same_ids(ours, ours.encode(TRICKY), tokenizer.encode(TRICKY))
    assert tokenizer.decode([*ours.encode(TRICKY), ours.end_of_document_id, ours.pad_id,
                             10**6]) == TRICKY
    # No config.json: the tokenizer's size, padded as ours is.
    assert tokenizer.vocab_size == ours.vocab_size
    assert (tokenizer.end_of_document_id, tokenizer.pad_id) == (ours.end_of_document_id,
                                                                ours.pad_id)
    np.testing.assert_array_equal(tokenizer.byte_lengths(), ours.byte_lengths())
    assert tokenizer.name.startswith("hf-") and tokenizer.name == HuggingFaceTokenizer(
        directory).name

    # config.json's vocab_size is the model's, above the tokenizer's; its eos_token_id wins.
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"vocab_size": ours.vocab_size + 128, "eos_token_id": [ours.pad_id, 7]}, f)
    tokenizer = HuggingFaceTokenizer(directory)
    assert tokenizer.vocab_size == ours.vocab_size + 128
    assert tokenizer.end_of_document_id == ours.pad_id
    lengths = tokenizer.byte_lengths()
    assert lengths.shape == (ours.vocab_size + 128,) and lengths.dtype == np.int32
    np.testing.assert_array_equal(lengths[:ours.vocab_size], ours.byte_lengths())
    assert not lengths[ours.vocab_size:].any()

    # And exported again (a run with data.tokenizer="hf"): still our ids.
    again = AutoTokenizer.from_pretrained(exported(tokenizer, tmp_path / "again"))
    check_same_ids(ours, ours.encode(TRICKY), again(TRICKY)["input_ids"])
    assert again.eos_token_id == ours.pad_id


@pytest.mark.parametrize("where", ["config.json", "generation_config.json",
                                   "tokenizer_config.json"])
def test_end_of_document_id_from_each_file_in_turn(where, tmp_path):
    directory = exported(ByteTokenizer(), tmp_path)
    if where != "tokenizer_config.json":
        with open(os.path.join(directory, where), "w") as f:
            json.dump({"eos_token_id": 10}, f)
    expected = 256 if where == "tokenizer_config.json" else 10
    tokenizer = HuggingFaceTokenizer(directory)
    assert tokenizer.end_of_document_id == expected
    plain = HuggingFaceTokenizer(exported(ByteTokenizer(), tmp_path / "plain"))
    # The cached tokens hold the end-of-document id: another id, another cache.
    assert (tokenizer.name == plain.name) == (expected == 256)


def test_a_folder_with_only_tokenizer_model(sentencepiece_path, validation_texts, tmp_path):
    """A SentencePiece ``tokenizer.model`` (Llama's layout) read through sentencepiece."""
    ours = SentencePieceTokenizer(sentencepiece_path)
    shutil.copy(sentencepiece_path, tmp_path / "tokenizer.model")
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"vocab_size": 1024, "eos_token_id": 1}, f)
    tokenizer = HuggingFaceTokenizer(str(tmp_path))
    for text in validation_texts:
        np.testing.assert_array_equal(tokenizer.encode(text), ours.encode(text))
    assert tokenizer.decode(ours.encode(TRICKY).tolist() + [1, 0]) == TRICKY
    assert (tokenizer.vocab_size, tokenizer.end_of_document_id, tokenizer.pad_id) == (1024, 1, 0)
    np.testing.assert_array_equal(tokenizer.byte_lengths(), ours.byte_lengths())
    # Exported, through the same conversion as data.sentencepiece_model.
    reference = AutoTokenizer.from_pretrained(exported(tokenizer, tmp_path / "out"))
    check_same_ids(ours, ours.encode(TRICKY), reference(TRICKY)["input_ids"])
    # No tokenizer.json: tokenizer_config.json's add_bos_token says whether there is a BOS.
    assert tokenizer.begin_of_document_id is None
    for token, message in (("<unk>", None), ("<nope>", r"its bos_token '<nope>' is not a token")):
        with open(tmp_path / "tokenizer_config.json", "w") as f:
            json.dump({"add_bos_token": True, "bos_token": token}, f)
        if message is None:
            assert HuggingFaceTokenizer(str(tmp_path)).begin_of_document_id == 2
        else:
            with pytest.raises(ValueError, match=message):
                HuggingFaceTokenizer(str(tmp_path))


def test_data_tokenizer_hf(tmp_path):
    config = get_config()
    config.tokenizer = "hf"
    with pytest.raises(ValueError, match=r"^data.tokenizer='hf' needs data.hf_tokenizer"):
        make_tokenizer(config)
    config.hf_tokenizer = exported(ByteTokenizer(), tmp_path)
    tokenizer = make_tokenizer(config)
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert tokenizer.encode("hé").tolist() == [104, 195, 169]


def _write(directory, name, content: bytes):
    with open(os.path.join(directory, name), "wb") as f:
        f.write(content)


@pytest.mark.parametrize("case,message", [
    ("missing", r"/nowhere: no such folder \(expected a Hugging Face model folder"),
    ("empty", r": neither tokenizer.json nor tokenizer.model"),
    ("bad tokenizer.json", r"tokenizer.json: not a tokenizers tokenizer.json \("),
    ("bad tokenizer.model", r"tokenizer.model: not a SentencePiece model \("),
    ("bad config.json", r"config.json: not JSON \("),
    ("small vocab_size", r"config.json: vocab_size=100, expected an int above the tokenizer's"),
    ("no eos", r": no end-of-document id \(expected eos_token_id in config.json"),
])
def test_bad_folders_are_one_line_errors(case, message, tmp_path):
    directory = str(tmp_path)
    if case == "missing":
        directory = str(tmp_path / "nowhere")
    elif case == "bad tokenizer.json":
        _write(directory, "tokenizer.json", b"{not json")
    elif case == "bad tokenizer.model":
        _write(directory, "tokenizer.model", b"\x00garbage")
    elif case != "empty":
        export_tokenizer(ByteTokenizer(), directory, 128)
        if case == "bad config.json":
            _write(directory, "config.json", b"{")
        elif case == "small vocab_size":
            _write(directory, "config.json", b'{"vocab_size": 100, "eos_token_id": 1}')
        else:
            os.remove(os.path.join(directory, "tokenizer_config.json"))
            os.remove(os.path.join(directory, "special_tokens_map.json"))
    with pytest.raises(ValueError, match=message) as error:
        HuggingFaceTokenizer(directory)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def lines():
    """About 100 KB of the stdlib's lines, to train small models on."""
    lines = []
    for document in read_documents(get_config(), "train"):
        lines += document.splitlines(keepends=True)
        if len(lines) > 2500:
            return lines


def _trained(tmp_path, lines, **settings) -> SentencePieceTokenizer:
    """A SentencePiece model trained with train_sentencepiece's settings but ``settings``."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(**{
        "sentence_iterator": iter(lines), "model_writer": model, "vocab_size": 600,
        "model_type": "unigram", "character_coverage": 1.0, "byte_fallback": True,
        "pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1,
        "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
        "add_dummy_prefix": False, "allow_whitespace_only_pieces": True,
        "hard_vocab_limit": False, "minloglevel": 2, **settings})
    path = tmp_path / "model.model"
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(str(path))


@pytest.mark.parametrize("settings", [{"add_dummy_prefix": True},
                                      {"byte_fallback": False, "bos_id": 3}])
def test_other_sentencepiece_settings_are_exported_exactly(settings, lines, tmp_path):
    ours = _trained(tmp_path, lines, **settings)
    reference = AutoTokenizer.from_pretrained(exported(ours, tmp_path / "out"))
    for text in [*lines[:200], "".join(lines[::10]), TRICKY, "", " ", "x", "  lead"]:
        ids = reference(text)["input_ids"]
        check_same_ids(ours, ours.encode(text), ids)
        if ours.processor.unk_id() not in ids:  # SentencePiece shows an unknown as " ⁇ "
            assert reference.decode(ids, skip_special_tokens=True) == ours.decode(ids)


@pytest.mark.parametrize("settings,message", [
    ({"normalization_rule_name": "nmt_nfkc"}, r"normalization rule 'nmt_nfkc' \(expected "),
    ({"remove_extra_whitespaces": True}, r"remove_extra_whitespaces=True \(expected False\)"),
    ({"model_type": "bpe"}, r"a BPE model \(expected unigram\)"),
    ({"user_defined_symbols": ["<tag>"]}, r"user-defined piece '<tag>'"),
    # Characters left out: a "<pad>" in text would be that piece, not SentencePiece's unknown.
    ({"character_coverage": 0.98}, r"piece '.+' holds '.', which is not a piece itself"),
])
def test_sentencepiece_models_that_cannot_be_exported_exactly(settings, message, lines,
                                                              tmp_path):
    ours = _trained(tmp_path, lines, **settings)
    with pytest.raises(ValueError, match=r"^data.sentencepiece_model='.*model.model': cannot "
                                         r"be exported exactly .*" + message) as error:
        export_tokenizer(ours, str(tmp_path), 128)
    assert "\n" not in str(error.value)


BOS = 258  # the byte tokenizer's next id: after the bytes, end of document (256) and pad (257)


def add_bos(directory, how: str = "template") -> None:
    """Gives the byte tokenizer exported in ``directory`` a ``<bos>`` (id `BOS`) that
    transformers adds before every text, as Gemma's and Llama's tokenizers do, through
    tokenizer.json's post-processor (``how="template"``, Gemma's tokenizer.json). Beside a
    tokenizer.json, transformers 5 ignores tokenizer_config.json's ``add_bos_token``:
    ``"flag"`` sets it without the template (no BOS), ``"flag_off"`` unsets it beside the
    template (a BOS)."""
    from tokenizers import AddedToken, Tokenizer, processors

    path = os.path.join(directory, "tokenizer.json")
    backend = Tokenizer.from_file(path)
    backend.add_special_tokens([AddedToken("<bos>", special=True, normalized=False)])
    assert backend.token_to_id("<bos>") == BOS
    if how != "flag":
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)])
    backend.save(path)
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("add_bos_token")
    if how != "template":
        config |= {"add_bos_token": how == "flag", "bos_token": "<bos>"}
    with open(config_path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("how", ["template", "flag", "flag_off"])
def test_a_tokenizer_that_adds_a_bos_begins_documents_with_it(how, tmp_path):
    from data.tokenizers import encode_document

    directory = exported(ByteTokenizer(), tmp_path / "source")
    add_bos(directory, how)
    tokenizer = HuggingFaceTokenizer(directory)
    reference = AutoTokenizer.from_pretrained(directory)
    expected = None if how == "flag" else BOS
    assert tokenizer.begin_of_document_id == expected
    for text in (TRICKY, "", "<bos>"):  # "<bos>" in text is text
        assert encode_document(tokenizer, text).tolist() == reference(text)["input_ids"]
        assert tokenizer.encode(text).tolist() == reference(text, add_special_tokens=False)[
            "input_ids"]

    # A run of this tokenizer exported: transformers still adds the BOS, and reads it back.
    again = exported(tokenizer, tmp_path / "again")
    assert AutoTokenizer.from_pretrained(again)(TRICKY)["input_ids"] == reference(TRICKY)[
        "input_ids"]
    assert HuggingFaceTokenizer(again).begin_of_document_id == expected
