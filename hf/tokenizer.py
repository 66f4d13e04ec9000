"""A Hugging Face model folder's tokenizer files, both directions.

``export_tokenizer`` writes one of this project's tokenizers (data/tokenizers.py: UTF-8 bytes,
SentencePiece) as ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``,
with which ``transformers.AutoTokenizer.from_pretrained(folder)`` gives exactly our ids: no BOS
(our models never saw one) but an imported model's, our end-of-document id as its EOS.
``tokenizer.json`` is built with the ``tokenizers`` library alone: exporting needs neither transformers nor torch.

``HuggingFaceTokenizer`` reads a Hugging Face model folder's tokenizer (``tokenizer.json``,
else SentencePiece's ``tokenizer.model``) as a `data.tokenizers.Tokenizer`, for
``data.tokenizer="hf"``: training or evaluating with a pretrained model's vocabulary.

Special tokens in text are text. Our tokenizers encode a document's literal ``</s>`` or
``<|endoftext|>`` as the characters it is made of (the end-of-document id comes only from the
pipeline, between documents), so the exported ``tokenizer_config.json`` sets transformers'
``split_special_tokens`` and ``HuggingFaceTokenizer`` encodes with the ``tokenizers`` library's
``encode_special_tokens``: to end a text, append ``eos_token_id``, not the string ``eos_token``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable

import numpy as np
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)

from data.tokenizers import ByteTokenizer, SentencePieceTokenizer, padded_vocab_size
from errors import UserError, first_line

# The names of the byte tokenizer's two special ids (it has none of its own): GPT-2's name for
# its end of text, and the usual padding name.
BYTES_END_OF_DOCUMENT = "<|endoftext|>"  # id 256
BYTES_PAD = "<pad>"  # id 257
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_SPACE = "\u2581"  # "▁": SentencePiece's stand-in for a space
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece, e.g. "<0x0A>"


def export_tokenizer(tokenizer, directory: str, model_max_length: int) -> None:
    """Writes ``tokenizer`` (a `ByteTokenizer`, `SentencePieceTokenizer` or
    `HuggingFaceTokenizer`) into ``directory`` (which exists) as `TOKENIZER_FILES`, the files
    of transformers' ``PreTrainedTokenizerFast``: ``AutoTokenizer.from_pretrained(directory)``
    encodes text to exactly `data.tokenizers.encode_document`'s ids: ``tokenizer.encode``'s,
    after its ``begin_of_document_id`` where it has one (a pretrained model's BOS), with no
    BOS otherwise; its ``eos_token_id`` is our ``end_of_document_id``, its ``pad_token_id``
    our ``pad_id``.

    The vocabulary is the tokenizer's real pieces; the model's (padded) ``vocab_size`` belongs
    to config.json. A SentencePiece model whose encoding the ``tokenizers`` library cannot
    reproduce exactly (see `_sentencepiece_backend`) is a one-line `UserError`.
    """
    if isinstance(tokenizer, ByteTokenizer):
        backend, unk = _byte_level_backend(), None
    elif isinstance(tokenizer, SentencePieceTokenizer):
        backend = _sentencepiece_backend(tokenizer.processor,
                                         f"data.sentencepiece_model={tokenizer.model_path!r}")
        unk = tokenizer.processor.id_to_piece(tokenizer.processor.unk_id())
    elif isinstance(tokenizer, HuggingFaceTokenizer):
        backend, unk = tokenizer.exportable_backend()
    else:
        raise UserError(f"cannot export a {type(tokenizer).__name__} tokenizer (expected bytes, "
                        f"sentencepiece or hf)")
    specials = {}
    bos = tokenizer.begin_of_document_id
    named = [("eos_token", "end-of-document", tokenizer.end_of_document_id),
             ("pad_token", "padding", tokenizer.pad_id)]
    if bos is not None:
        named.append(("bos_token", "beginning-of-document", bos))
    for key, what, i in named:
        specials[key] = backend.id_to_token(i) if i >= 0 else None
        if specials[key] is None:
            source = getattr(tokenizer, "path", None) or getattr(tokenizer, "model_path", "")
            raise UserError(f"{source or tokenizer.name}: its {what} id {i} is not one of the "
                            f"tokenizer's tokens, so it cannot be exported")
    if unk is not None:
        specials["unk_token"] = unk
    if bos is not None:  # as transformers' own template for add_bos_token
        token = specials["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{token}:0 $A:0", pair=f"{token}:0 $A:0 {token}:1 $B:1",
            special_tokens=[(token, bos)])
    backend.save(os.path.join(directory, "tokenizer.json"))
    # transformers' PreTrainedTokenizerFast rebuilds the post-processor from add_bos_token and
    # add_eos_token: only the BOS of a model that has one (our models never saw one), no EOS
    # after the text; special tokens' text kept as text (split_special_tokens, as our
    # tokenizers do), decode not respacing punctuation (clean_up_tokenization_spaces).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "add_bos_token": bos is not None, "add_eos_token": False,
              "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, "model_max_length": int(model_max_length)}
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)
    _write_json(os.path.join(directory, "special_tokens_map.json"), specials)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _byte_characters() -> list[str]:
    """The character that stands for each byte 0..255 in a byte-level BPE vocabulary: GPT-2's
    ``bytes_to_unicode`` (OpenAI's encoder.py; the ``tokenizers`` ByteLevel pre-tokenizer's
    alphabet). Printable Latin-1 bytes stand for themselves, the others, in order, for
    U+0100, U+0101, ..."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    characters, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(256 + shifted))
            shifted += 1
    return characters


def _byte_level_backend() -> Tokenizer:
    """`ByteTokenizer` as a byte-level BPE with no merges (GPT-2's layout): the ByteLevel
    pre-tokenizer turns each UTF-8 byte into its character, the vocabulary maps the character
    of byte b to id b, so every byte is one token; end of document and padding are special
    tokens 256 and 257."""
    vocabulary = {character: byte for byte, character in enumerate(_byte_characters())}
    backend = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    # No regex split (it changes nothing without merges), no space added before the text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(BYTES_END_OF_DOCUMENT, special=True, normalized=False),
                                AddedToken(BYTES_PAD, special=True, normalized=False)])
    assert backend.token_to_id(BYTES_END_OF_DOCUMENT) == ByteTokenizer.end_of_document_id
    assert backend.token_to_id(BYTES_PAD) == ByteTokenizer.pad_id
    return backend


def _sentencepiece_backend(processor, label: str) -> Tokenizer:
    """A SentencePiece unigram model (``processor``, a ``SentencePieceProcessor``) as a
    ``tokenizers`` Unigram model that gives the same ids, as transformers' ``SpmConverter``
    does but exact for the models trained here (data.tokenizers.train_sentencepiece: identity
    normalisation, no dummy prefix, byte fallback), and also with a dummy prefix or without
    byte fallback. ``label`` names the model in errors.

    SentencePiece's unigram encoder (unigram_model.cc, ``EncodeOptimized``) is a Viterbi search
    over the text with " " escaped as "▁", among the normal pieces only: control, unknown, byte
    and unused pieces are never matched in text, an unseen character is the unknown id (then
    its UTF-8 bytes' pieces, with byte fallback) scored ``min normal score - 10``. The
    ``tokenizers`` Unigram runs the same search (same order, same ties) but over every piece,
    with the unknown score taken from the lowest of all; so those pieces get a score below any
    spelling of their text in characters, which they then never beat, and a change in the
    unknown score changes nothing because no piece holds an unseen character (checked).

    Not exact: ties. SentencePiece sums the path scores in float32 as it goes, the tokenizers
    library in float64, so paths that tie (the same pieces in another order, as in a run of
    spaces) or come within the running sum's float32 resolution (0.001 after a few thousand
    tokens) may be decided differently. Both spell the same text; on the stdlib with 1024
    pieces, about 5 in 100,000 tokens differ (in 1 document of 12).
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    cannot = f"{label}: cannot be exported exactly to a Hugging Face tokenizer:"
    if trainer.model_type != trainer.UNIGRAM:
        raise UserError(f"{cannot} a {trainer.ModelType.Name(trainer.model_type)} model "
                        f"(expected unigram)")
    # The normalisation rules (NFKC and the like) are a precompiled character map, which
    # identity has none of; the tokenizers library's Precompiled normalizer is not known to
    # match SentencePiece's longest-match rewriting on every text.
    if spec.precompiled_charsmap or proto.denormalizer_spec.precompiled_charsmap:
        raise UserError(f"{cannot} normalization rule {spec.name!r} (expected 'identity')")
    for setting, value, expected in (
            ("remove_extra_whitespaces", spec.remove_extra_whitespaces, False),
            ("escape_whitespaces", spec.escape_whitespaces, True),
            ("treat_whitespace_as_suffix", trainer.treat_whitespace_as_suffix, False)):
        if value != expected:
            raise UserError(f"{cannot} {setting}={value} (expected {expected})")

    size = processor.get_piece_size()
    pieces = [processor.id_to_piece(i) for i in range(size)]
    user_defined = [p for p in proto.pieces if p.type == p.USER_DEFINED]
    if user_defined:  # SentencePiece gives them a bonus in the search, no fixed score
        raise UserError(f"{cannot} user-defined piece {user_defined[0].piece!r}")
    if len(set(pieces)) != size:
        raise UserError(f"{cannot} a piece appears twice (as a normal and a special piece)")
    never_matched = [processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i)
                     or processor.is_unused(i) for i in range(size)]
    normal = [i for i in range(size) if not never_matched[i]]
    characters = {pieces[i] for i in normal if len(pieces[i]) == 1}
    for i in range(size):
        unseen = set(pieces[i]) - characters
        if unseen:
            raise UserError(f"{cannot} piece {pieces[i]!r} holds {sorted(unseen)[0]!r}, which "
                            f"is not a piece itself (a text holding {pieces[i]!r} would encode "
                            f"differently)")
    lowest = min(0.0, *(processor.get_score(i) for i in normal))
    # Below the score of any spelling of the piece's text in single characters, and by a
    # margin that float rounding cannot close.
    vocabulary = [(piece, len(piece) * lowest - 10.0 if never_matched[i]
                   else processor.get_score(i)) for i, piece in enumerate(pieces)]
    byte_fallback = bool(trainer.byte_fallback)
    if byte_fallback and sum(processor.is_byte(i) for i in range(size)) != 256:
        raise UserError(f"{cannot} byte fallback without the 256 byte pieces")
    backend = Tokenizer(models.Unigram(vocabulary, unk_id=processor.unk_id(),
                                       byte_fallback=byte_fallback))
    # SentencePiece's normalizer (normalizer.cc) with the identity rule: the dummy prefix "▁"
    # before a non-empty text where set, then each " " as "▁"; nothing else changes.
    steps = [normalizers.Replace(" ", _SPACE)]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    # SentencePiece's decoder: "▁" as a space, byte pieces back to their bytes, the dummy
    # prefix's space dropped from the start.
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    # Control pieces (pad, eos, bos) and the unknown piece: special tokens, dropped by decode's
    # skip_special_tokens; their ids stay the model's.
    backend.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                                for i in range(size)
                                if processor.is_control(i) or processor.is_unknown(i)])
    return backend


def _read_json(path: str) -> dict | None:
    """The JSON object in ``path``; None where there is no such file."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not JSON ({first_line(error)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or transformers'
    ``AddedToken`` as a dict with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer:
    """The tokenizer of a Hugging Face model folder, as a `data.tokenizers.Tokenizer`:
    ``tokenizer.json`` through the ``tokenizers`` library, else ``tokenizer.model`` through
    sentencepiece. ``encode`` adds no special token to a text, and special tokens' strings in
    it are text (see the module docstring); the BOS that transformers' tokenizer puts before
    a text is ``begin_of_document_id``, which `data.tokenizers.encode_document` puts at the
    start of every document (Gemma and Llama were trained so).

    Hugging Face's conventions (transformers' ``PretrainedConfig`` and
    ``GenerationConfig``): ``vocab_size`` is config.json's, the model's, which may exceed the
    tokenizer's; the end of document is config.json's ``eos_token_id`` (an int or a list, whose
    first is taken), else generation_config.json's, else tokenizer_config.json's
    ``eos_token``; padding is the tokenizer's pad token, else the end of document (padding is
    never scored: the loss mask drops it). The BOS as transformers 5 decides it: what
    tokenizer.json's post-processor puts before a text (its template; tokenizer_config.json's
    ``add_bos_token`` is then ignored); with tokenizer.model alone, tokenizer_config.json's
    ``bos_token`` where its ``add_bos_token`` is true.
    """

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise UserError(f"{directory}: no such folder (expected a Hugging Face model "
                            f"folder with tokenizer.json or tokenizer.model)")
        self.directory = directory
        for file in ("tokenizer.json", "tokenizer.model"):
            path = os.path.join(directory, file)
            if os.path.exists(path):
                break
        else:
            raise UserError(f"{directory}: neither tokenizer.json nor tokenizer.model (expected "
                            f"a Hugging Face model folder's tokenizer)")
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as error:
            raise UserError(f"{path}: cannot read ({error.strerror})") from None
        self._backend = self._processor = None
        if file == "tokenizer.json":
            try:
                self._backend = Tokenizer.from_str(raw.decode("utf-8"))
            except Exception as error:  # the library raises a bare Exception on a bad file
                raise UserError(f"{path}: not a tokenizers tokenizer.json "
                                f"({first_line(error)})") from None
            self._backend.encode_special_tokens = True  # special tokens' text is text
            self._size = self._backend.get_vocab_size(with_added_tokens=True)
        else:
            import sentencepiece

            try:
                self._processor = sentencepiece.SentencePieceProcessor(model_proto=raw)
            except RuntimeError as error:
                raise UserError(f"{path}: not a SentencePiece model "
                                f"({first_line(error)})") from None
            self._size = self._processor.get_piece_size()

        config = _read_json(os.path.join(directory, "config.json")) or {}
        text_config = config.get("text_config") or {}  # multimodal models keep it there

        def setting(name):
            return config.get(name, text_config.get(name))

        self.vocab_size = setting("vocab_size")
        if self.vocab_size is None:
            self.vocab_size = padded_vocab_size(self._size)
        elif not isinstance(self.vocab_size, int) or self.vocab_size < self._largest_encoded_id() + 1:
            raise UserError(f"{directory}/config.json: vocab_size={self.vocab_size!r}, expected "
                            f"an int above the tokenizer's ids (up to "
                            f"{self._largest_encoded_id()})")
        self.end_of_document_id = self._end_of_document_id(setting("eos_token_id"))
        self.pad_id = self._pad_id()
        self.begin_of_document_id = self._begin_of_document_id()
        for name in ("end_of_document_id", "pad_id", "begin_of_document_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise UserError(f"{directory}: {name} {value} is not below vocab_size "
                                f"{self.vocab_size}")
        # The token cache is keyed by the name; the end-of-document id is in the cached tokens
        # (the BOS too, which data/token_cache.py keys by itself).
        digest = hashlib.sha1(raw + f"\0eos={self.end_of_document_id}".encode())
        self.name = "hf-" + digest.hexdigest()[:12]

    def _largest_encoded_id(self) -> int:
        """The largest id ``encode`` may give: the model's pieces and non-special added
        tokens (special tokens' text is encoded as text)."""
        if self._processor is not None:
            return self._size - 1
        added = self._backend.get_added_tokens_decoder()
        return max([self._backend.get_vocab_size(with_added_tokens=False) - 1,
                    *(i for i, token in added.items() if not token.special)])

    def _token_id(self, token: str) -> int | None:
        if self._backend is not None:
            return self._backend.token_to_id(token)
        i = self._processor.piece_to_id(token)  # the unknown id where there is no such piece
        return i if self._processor.id_to_piece(i) == token else None

    def _tokenizer_config(self, key: str) -> str | None:
        """A special token's string from tokenizer_config.json, else special_tokens_map.json."""
        for file in ("tokenizer_config.json", "special_tokens_map.json"):
            token = _token_string((_read_json(os.path.join(self.directory, file)) or {}).get(key))
            if token is not None:
                return token
        return None

    def _end_of_document_id(self, eos_token_id) -> int:
        sources = [("config.json", eos_token_id)]
        generation = _read_json(os.path.join(self.directory, "generation_config.json")) or {}
        sources.append(("generation_config.json", generation.get("eos_token_id")))
        for file, value in sources:
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        token = self._tokenizer_config("eos_token")
        if token is not None:
            i = self._token_id(token)
            if i is None:
                raise UserError(f"{self.directory}/tokenizer_config.json: eos_token {token!r} "
                                f"is not a token of {self.path}")
            return i
        raise UserError(f"{self.directory}: no end-of-document id (expected eos_token_id in "
                        f"config.json or generation_config.json, or eos_token in "
                        f"tokenizer_config.json)")

    def _begin_of_document_id(self) -> int | None:
        if self._backend is None:
            settings = _read_json(os.path.join(self.directory, "tokenizer_config.json")) or {}
            if not settings.get("add_bos_token"):
                return None
            token = self._tokenizer_config("bos_token")
            i = None if token is None else self._token_id(token)
            if i is None:
                raise UserError(f"{self.directory}/tokenizer_config.json: add_bos_token is set "
                                f"but its bos_token {token!r} is not a token of {self.path}")
            return i
        # What the post-processor puts before a text ("<bos> $A": one id); transformers 5
        # ignores tokenizer_config.json's add_bos_token beside a tokenizer.json.
        text = self._backend.encode("a", add_special_tokens=False).ids
        full = self._backend.encode("a", add_special_tokens=True).ids
        before = next(full[:k] for k in range(len(full) - len(text) + 1)
                      if full[k:k + len(text)] == text)
        if len(before) > 1:
            raise UserError(f"{self.path}: its post-processor puts {len(before)} tokens "
                            f"{before} before a text; expected at most one, a BOS")
        return before[0] if before else None

    def _pad_id(self) -> int:
        token = self._tokenizer_config("pad_token")
        i = None if token is None else self._token_id(token)
        if i is None and self._processor is not None and self._processor.pad_id() >= 0:
            i = self._processor.pad_id()
        return self.end_of_document_id if i is None else i

    def encode(self, text: str) -> np.ndarray:
        if self._processor is not None:
            # int32 straight from SentencePiece's buffer: about 30% less time than its list of ints
            return self._processor.encode(text, out_type="numpy")
        return np.asarray(self._backend.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` without special ones (control tokens, end of document, padding)
        and ids beyond the tokenizer."""
        dropped = {self.end_of_document_id, self.pad_id}
        ids = [int(i) for i in ids if 0 <= i < self._size and int(i) not in dropped]
        if self._processor is not None:
            return self._processor.decode([i for i in ids if not self._processor.is_control(i)])
        return self._backend.decode(ids, skip_special_tokens=True)

    def byte_lengths(self) -> np.ndarray:
        """int32 (vocab_size,): how many bytes of text each id stands for (for bits per byte).
        A byte-level BPE's piece (GPT-2's layout) one per character, a SentencePiece-style
        piece its UTF-8 length with "▁" as a space, a byte-fallback piece ``<0xNN>`` 1, an
        added (non-special) token its text's UTF-8 length; special, control and unknown ids
        and ids beyond the tokenizer 0."""
        lengths = np.zeros(self.vocab_size, np.int32)
        if self._processor is not None:  # as data.tokenizers.SentencePieceTokenizer
            processor = self._processor
            for i in range(self._size):
                if processor.is_byte(i):
                    lengths[i] = 1
                elif not (processor.is_control(i) or processor.is_unknown(i)):
                    lengths[i] = len(processor.id_to_piece(i).replace(_SPACE, " ").encode())
            return lengths
        layout = json.loads(self._backend.to_str())
        model = layout["model"]
        byte_level = _has_step(layout.get("decoder"), "ByteLevel") or _has_step(
            layout.get("pre_tokenizer"), "ByteLevel")
        byte_of = {character: byte for byte, character in enumerate(_byte_characters())}
        added = self._backend.get_added_tokens_decoder()
        unknown = {model.get("unk_id"), self._backend.token_to_id(model.get("unk_token") or "")}
        prefix = model.get("continuing_subword_prefix") or ""  # WordPiece's "##"
        for token, i in self._backend.get_vocab(with_added_tokens=True).items():
            if i >= self.vocab_size or i in unknown or (i in added and added[i].special):
                continue
            if i in added:  # its text as it is, matched before the model
                lengths[i] = len(token.encode())
            elif model.get("byte_fallback") and _BYTE_PIECE.fullmatch(token):
                lengths[i] = 1
            elif byte_level:
                lengths[i] = sum(1 if c in byte_of else len(c.encode()) for c in token)
            else:
                if prefix and token.startswith(prefix):
                    token = token[len(prefix):]
                lengths[i] = len(token.replace(_SPACE, " ").encode())
        return lengths

    def exportable_backend(self) -> tuple[Tokenizer, str | None]:
        """(a ``tokenizers`` Tokenizer that encodes as this one, its unknown token or None),
        for `export_tokenizer`: tokenizer.json without its post-processor (which may add a
        BOS), or tokenizer.model converted as data.sentencepiece_model is."""
        if self._processor is not None:
            unk = self._processor.id_to_piece(self._processor.unk_id())
            return _sentencepiece_backend(self._processor, self.path), unk
        backend = Tokenizer.from_str(self._backend.to_str())
        backend.post_processor = None
        model = json.loads(backend.to_str())["model"]
        unk = model.get("unk_token")
        if model.get("unk_id") is not None:
            unk = backend.id_to_token(model["unk_id"])
        return backend, unk


def _has_step(component: dict | None, kind: str) -> bool:
    """Whether a tokenizer.json normalizer, pre-tokenizer or decoder is or holds (in a
    Sequence) a step of type ``kind``."""
    if not component:
        return False
    steps = component.get("decoders") or component.get("pretokenizers") or [component]
    return any(step.get("type") == kind for step in steps)
