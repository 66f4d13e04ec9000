"""A whole Hugging Face model folder written from a trained run: what export.py writes.

    config.json                     hf.config.hf_config (4.x layout, float32)
    generation_config.json          the end-of-document id as EOS; the BOS of an imported
                                    model that has one (our models have none)
    model.safetensors               or model-0000K-of-0000N.safetensors with
                                    model.safetensors.index.json above max_shard_bytes
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   hf.tokenizer

`transformers`' ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
load it; writing it needs neither transformers nor torch. The folder is written under a
temporary name and renamed when complete, so an interrupted export leaves nothing that looks
whole.
"""

from __future__ import annotations

import json
import os
import shutil

from safetensors.numpy import save_file

from data.tokenizers import Tokenizer
from errors import UserError
from hf.config import hf_config
from hf.params import export_tensors
from hf.tokenizer import export_tokenizer
from model.config import TransformerConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' save_pretrained default is 5 GB too


# The file that marks ``<output>.partial`` as an export in progress (a killed one's leftovers,
# which the next export may delete).
_IN_PROGRESS = ".export-in-progress"


def write_model_folder(output: str, params, config: TransformerConfig, tokenizer: Tokenizer,
                       max_position_embeddings: int,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Writes ``params`` (our tree) of a ``config`` model with its ``tokenizer`` as the
    Hugging Face folder ``output`` (which must not exist yet).

    ``max_position_embeddings``: the context it was trained at (config.json's field).
    Raises a one-line `UserError` where ``output`` exists or the model cannot be exported
    (`hf.config.hf_config`), before anything is written.
    """
    if not output:
        raise UserError("--output is empty: expected the path of a new folder")
    if os.path.exists(output):
        raise UserError(f"--output={output}: it exists; name a new folder")
    values = hf_config(config, max_position_embeddings, tokenizer.end_of_document_id,
                       tokenizer.pad_id, tokenizer.begin_of_document_id)
    partial = output.rstrip(os.sep) + ".partial"
    marker = os.path.join(partial, _IN_PROGRESS)
    if os.path.exists(partial):
        if not os.path.isfile(marker):  # not ours: the user's, never deleted
            raise UserError(f"--output={output}: {partial} exists and is not a killed "
                            f"export's; move it away or name another folder")
        shutil.rmtree(partial)  # a killed export's leftovers
    try:
        os.makedirs(partial)
        open(marker, "w").close()
    except OSError as error:
        raise UserError(f"--output={output}: cannot create it ({error.strerror})") from None
    _write_json(os.path.join(partial, "config.json"), values)
    _write_json(os.path.join(partial, "generation_config.json"), {
        "bos_token_id": tokenizer.begin_of_document_id,
        "eos_token_id": tokenizer.end_of_document_id,
        "pad_token_id": tokenizer.pad_id})
    _write_tensors(partial, export_tensors(params, config), max_shard_bytes)
    export_tokenizer(tokenizer, partial, model_max_length=values["max_position_embeddings"])
    os.remove(marker)
    os.replace(partial, output)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _write_tensors(folder: str, tensors, max_shard_bytes: int) -> None:
    """``(name, array)`` pairs as safetensors files of at most ``max_shard_bytes`` each (a
    larger tensor alone in its file), with the index transformers reads where there are
    several; at most one file's tensors are in memory at a time."""
    shards: list[list[str]] = []
    pending: dict = {}
    pending_bytes = 0
    total = 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, os.path.join(folder, f"shard-{len(shards)}.tmp"),
                      metadata={"format": "pt"})  # transformers reads "pt"-format files
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        if pending and pending_bytes + tensor.nbytes > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += tensor.nbytes
        total += tensor.nbytes
    flush()
    if len(shards) == 1:
        os.replace(os.path.join(folder, "shard-0.tmp"), os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(folder, f"shard-{index}.tmp"), os.path.join(folder, file))
        weight_map |= {name: file for name in names}
    _write_json(os.path.join(folder, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
