"""Parameters between this project's tree and the Hugging Face tensor names of each family
(`hf.families`: Mistral/Llama names, Gemma's four norms a layer, Qwen's q/k/v biases and
q/k norms, OLMo's post-norms, Phi-3's fused tensors).

Each of our parameters is (a part of) one tensor of the Hugging Face layout per layer,
transposed and reshaped (torch's ``Linear`` keeps ``(out, in)``; our kernels ``(in, heads,
head_dim)`` and ``(heads, head_dim, out)``); Phi-3's ``qkv_proj`` and ``gate_up_proj`` stack
several along axis 0. Queries and keys need no permutation: every family here rotates halves
(`model.rope.apply_rotary`; Meta's original checkpoints, which interleave pairs, would).
Gemma's ``(1 + w)`` norms load unchanged: our ``rmsnorm_plus_one`` stores ``w``.

Our input embeddings may be scaled by ``sqrt(d_model)`` (``model.scale_embeddings``, Gemma's
scheme); Mistral's are not. Export to Mistral folds the scale into the embedding table, and
where the table is also the output projection (tied), divides the final norm's scale by it,
so that the logits are unchanged: the exported model computes the same function with
``scale_embeddings`` off, which is what an import gives back.

`export_tensors` yields ``(name, array)`` for writing; `load_params` builds our parameters
tensor by tensor straight into their shards (`jax.make_array_from_callback`), so that host
memory holds about one tensor at a time, not the model.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import numpy as np
from safetensors import safe_open

from errors import UserError
from hf.families import family_of
from model.config import TransformerConfig

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# Tensors of a Hugging Face checkpoint that hold no parameter: RoPE's inverse frequencies,
# which older Llama checkpoints saved.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class _Part(NamedTuple):
    """One of our parameters in a layer as (part of) one Hugging Face tensor: its path in
    the layer, the conversions of one layer's slice both ways, and its rows in the Hugging
    Face tensor (fused tensors, Phi-3's, stack several parts along axis 0)."""

    path: tuple[str, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    rows: int


def _layer_tensors(config: TransformerConfig) -> list[tuple[str, list[_Part]]]:
    """``(Hugging Face name in a layer, its parts)`` of every tensor a layer of ``config``
    has, for the family ``model.hf_model_type`` names (`hf.families`)."""
    d, heads, kv_heads = config.d_model, config.num_heads, config.resolved_num_kv_heads
    head_dim = config.resolved_head_dim

    def projection(name, count):  # (count * head_dim, d) <-> (d, count, head_dim)
        return _Part(("attention", name, "kernel"), lambda w: w.T.reshape(d, count, head_dim),
                     lambda k: k.reshape(d, count * head_dim).T, count * head_dim)

    def per_head(path, count):  # (count * head_dim,) <-> (count, head_dim)
        return _Part(path, lambda w: w.reshape(count, head_dim), lambda b: b.reshape(-1),
                     count * head_dim)

    def same(path, rows):
        return _Part(path, lambda w: w, lambda w: w, rows)

    def mlp(name, rows):  # torch's Linear (out, in) <-> our (in, out)
        return _Part(("mlp", name, "kernel"), lambda w: w.T, lambda k: k.T, rows)

    q, k, v = (projection(name, count) for name, count in
               (("query", heads), ("key", kv_heads), ("value", kv_heads)))
    gated = config.activation in ("swiglu", "geglu")
    up = [mlp("gate", config.mlp_dim)] * gated + [mlp("up", config.mlp_dim)]
    if family_of(config.hf_model_type).fused_projections:
        tensors = [("self_attn.qkv_proj.weight", [q, k, v]), ("mlp.gate_up_proj.weight", up)]
    else:
        tensors = [(f"self_attn.{n}_proj.weight", [part]) for n, part in zip("qkv", (q, k, v))]
        tensors += [(f"mlp.{name}_proj.weight", [part])
                    for name, part in zip(("gate", "up")[-len(up):], up)]
    tensors += [
        ("self_attn.o_proj.weight", [_Part(("attention", "out", "kernel"),
                                           lambda w: w.T.reshape(heads, head_dim, d),
                                           lambda k: k.reshape(heads * head_dim, d).T, d)]),
        ("mlp.down_proj.weight", [mlp("down", d)]),
    ]
    if config.qkv_bias:
        tensors += [(f"self_attn.{n}_proj.bias", [per_head(("attention", name, "bias"), count)])
                    for n, name, count in (("q", "query", heads), ("k", "key", kv_heads),
                                           ("v", "value", kv_heads))]
    if config.qk_norm != "none":
        for n, name, count in (("q", "query_norm", heads), ("k", "key_norm", kv_heads)):
            path = ("attention", name, "scale")
            part = same(path, head_dim) if config.qk_norm == "head" else per_head(path, count)
            tensors.append((f"self_attn.{n}_norm.weight", [part]))
    # The norms by their place (model.block_norms): Llama's post_attention_layernorm is the
    # MLP's input norm; Gemma's and OLMo's is the attention output's.
    norms = {"pre": [("input_layernorm", "attention_norm"),
                     ("post_attention_layernorm", "mlp_norm")],
             "sandwich": [("input_layernorm", "attention_norm"),
                          ("post_attention_layernorm", "post_attention_norm"),
                          ("pre_feedforward_layernorm", "mlp_norm"),
                          ("post_feedforward_layernorm", "post_mlp_norm")],
             "post": [("post_attention_layernorm", "post_attention_norm"),
                      ("post_feedforward_layernorm", "post_mlp_norm")]}[config.block_norms]
    tensors += [(f"{hf_name}.weight", [same((name, "scale"), d)]) for hf_name, name in norms]
    return tensors


def _embedding_scale(config: TransformerConfig) -> np.float32:
    """What export multiplies the embedding table by: our input scale, folded in where the
    target family does not scale its embeddings (Mistral; Gemma scales them itself)."""
    folded = config.scale_embeddings and not family_of(config.hf_model_type).fixed[
        "scale_embeddings"]
    return np.sqrt(np.float32(config.d_model)) if folded else np.float32(1)


def export_tensors(params, config: TransformerConfig) -> Iterator[tuple[str, np.ndarray]]:
    """``(Hugging Face name, float32 array)`` of every tensor of ``params`` (our tree, scanned
    or not, as numpy or jax arrays), in the Hugging Face layout and order."""
    def leaf(tree, path):
        for key in path:
            tree = tree[key]
        return np.asarray(tree, np.float32)

    scale = _embedding_scale(config)
    yield "model.embed_tokens.weight", leaf(params, ("embed", "embedding")) * scale
    for layer in range(config.num_layers):
        for name, parts in _layer_tensors(config):
            if config.scan_layers:
                slices = [leaf(params, ("layers", *part.path))[layer] for part in parts]
            else:
                slices = [leaf(params, (f"layer_{layer}", *part.path)) for part in parts]
            tensor = np.concatenate([part.to_hf(x) for part, x in zip(parts, slices)])
            yield f"model.layers.{layer}.{name}", np.ascontiguousarray(tensor)
    final_scale = leaf(params, ("final_norm", "scale"))
    yield "model.norm.weight", final_scale / scale if config.tie_embeddings else final_scale
    if not config.tie_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(leaf(params, ("logits", "kernel")).T)


# Where a multimodal checkpoint keeps its language model (Gemma 3): the prefixes of its body
# and its output head, as saved (transformers writes 4.x names) and as transformers 5 names
# them in memory. The text-only names are "model." and "lm_head.".
_LANGUAGE_MODEL_PREFIXES = (("language_model.model.", "language_model.lm_head."),
                            ("model.language_model.", "lm_head."))


def _text_model_names(stored: set[str]) -> dict[str, str]:
    """Text-only name -> stored name of each language-model tensor among ``stored``: the
    names themselves, or a multimodal checkpoint's language model under the text-only names
    (its vision tower and projector left out)."""
    for body, head in _LANGUAGE_MODEL_PREFIXES:
        if any(name.startswith(body) for name in stored):
            names = {}
            for name in stored:
                if name.startswith(body):
                    names["model." + name[len(body):]] = name
                elif name.startswith(head):
                    names["lm_head." + name[len(head):]] = name
            return names
    return {name: name for name in stored}


class TensorFiles:
    """The tensors of a Hugging Face folder's ``model.safetensors`` or of the shards that
    ``model.safetensors.index.json`` lists, read one at a time, by the names of a text-only
    model (a multimodal checkpoint's language model, `_text_model_names`).

    A missing file, a tensor that the index names but its file lacks, or an unreadable file
    is a one-line `UserError` naming it (`transformers` would only warn and initialise the
    tensor randomly).
    """

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, _INDEX)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    self.file_of = dict(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise UserError(f"{index}: cannot read its weight_map ({error})") from None
        elif os.path.exists(os.path.join(folder, _SINGLE)):
            with self._open(_SINGLE) as f:
                self.file_of = {name: _SINGLE for name in f.keys()}
        else:
            raise UserError(f"{folder}: neither {_SINGLE} nor {_INDEX} is there (expected a "
                            f"Hugging Face model folder with safetensors)")
        self.stored = _text_model_names(set(self.file_of))

    def _open(self, file: str):
        path = os.path.join(self.folder, file)
        try:
            return safe_open(path, framework="numpy")
        except Exception as error:  # safetensors raises its own types for a bad file
            raise UserError(f"{path}: cannot read it as safetensors ({error})") from None

    def names(self) -> set[str]:
        """The language model's tensors, by their text-only names."""
        return set(self.stored)

    @contextlib.contextmanager
    def _file_holding(self, name: str):
        """``(the open file that the index places name in, its stored name)`` for a text-only
        ``name``, the file checked to hold it: a header or tensor access raises safetensors'
        own error (a traceback) for a name it lacks."""
        name = self.stored[name]
        file = self.file_of[name]
        with self._open(file) as f:
            if name not in f.keys():
                raise UserError(f"{os.path.join(self.folder, file)} lacks the tensor {name} "
                                f"that {_INDEX} places there")
            yield f, name

    def shape(self, name: str) -> tuple[int, ...]:
        with self._file_holding(name) as (f, stored):
            return tuple(f.get_slice(stored).get_shape())

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as float32; the file is opened for it alone, so that its pages
        leave memory with it."""
        with self._file_holding(name) as (f, stored):
            return f.get_tensor(stored).astype(np.float32, copy=False)


class _Leaf(NamedTuple):
    """How one of our parameters is read: the Hugging Face tensors it is built from (one per
    layer where it is scanned), how to build it (from a function reading a tensor by name,
    and those names), its part of each tensor, and that tensor's rows (all its parts')."""

    names: list[str]
    build: Callable[[Callable[[str], np.ndarray], list[str]], np.ndarray]
    part: _Part
    tensor_rows: int


def _our_leaves(config: TransformerConfig) -> dict[tuple, _Leaf]:
    """Each of our parameter paths -> its `_Leaf`."""
    scale = _embedding_scale(config)
    same = _Part((), lambda w: w, lambda w: w, config.vocab_size)
    leaves = {
        ("embed", "embedding"): _Leaf(["model.embed_tokens.weight"],
                                      lambda read, names: read(names[0]) / scale, same,
                                      config.vocab_size),
        ("final_norm", "scale"): _Leaf(["model.norm.weight"], lambda read, names: read(names[0])
                                       * (scale if config.tie_embeddings else 1),
                                       same._replace(rows=config.d_model), config.d_model),
    }
    if not config.tie_embeddings:
        leaves[("logits", "kernel")] = _Leaf(
            ["lm_head.weight"], lambda read, names: read(names[0]).T,
            _Part((), lambda w: w.T, lambda k: k.T, config.vocab_size), config.vocab_size)
    for name, parts in _layer_tensors(config):
        names = [f"model.layers.{layer}.{name}" for layer in range(config.num_layers)]
        offset, tensor_rows = 0, sum(part.rows for part in parts)
        for part in parts:
            def convert(tensor, part=part, offset=offset):
                return part.to_ours(tensor[offset:offset + part.rows])

            if config.scan_layers:
                leaves[("layers", *part.path)] = _Leaf(
                    names, lambda read, names, convert=convert: np.stack(
                        [convert(read(n)) for n in names]), part, tensor_rows)
            else:
                for layer, hf_name in enumerate(names):
                    leaves[(f"layer_{layer}", *part.path)] = _Leaf(
                        [hf_name], lambda read, names, convert=convert: convert(read(names[0])),
                        part, tensor_rows)
            offset += part.rows
    return leaves


def load_params(folder: str, config: TransformerConfig, abstract_params):
    """Our parameters for ``config`` from the Hugging Face folder, laid out as
    ``abstract_params`` (a tree of ``jax.ShapeDtypeStruct`` with shardings) says.

    Each parameter is read, converted and placed into its shards before the next is read.
    One-line `UserError`s: a tensor missing, one this model has no place for, or a shape
    other than ``config`` needs (naming the tensor and both shapes).
    """
    files = TensorFiles(folder)
    leaves = _our_leaves(config)
    wanted = {name for leaf in leaves.values() for name in leaf.names}
    spare = sorted(name for name in files.names() - wanted
                   if not name.endswith(_IGNORED_SUFFIXES)
                   and not (config.tie_embeddings and name == "lm_head.weight"))
    if spare:
        raise UserError(f"{folder}: tensor {spare[0]} has no place in this model (its "
                        f"config.json describes no such tensor)")
    missing = sorted(wanted - files.names())
    if missing:
        raise UserError(f"{folder}: tensor {missing[0]} is missing")

    def key_path(path):
        return tuple(getattr(key, "key", key) for key in path)

    def check_shapes(path, abstract):  # every header before any tensor is read
        leaf = leaves[key_path(path)]
        layer_shape = abstract.shape[1:] if path[0].key == "layers" else abstract.shape
        part_shape = jax.eval_shape(leaf.part.to_hf,
                                    jax.ShapeDtypeStruct(layer_shape, np.float32)).shape
        expected = (leaf.tensor_rows, *part_shape[1:])
        for name in leaf.names:
            if files.shape(name) != expected:
                raise UserError(f"{folder}: tensor {name} has shape {files.shape(name)}; this "
                                f"model needs {expected} (from its model.* config)")

    def build(path, abstract):
        leaf = leaves[key_path(path)]
        tensor = leaf.build(files.read, leaf.names)
        return jax.make_array_from_callback(abstract.shape, abstract.sharding,
                                            lambda index: tensor[index])

    jax.tree_util.tree_map_with_path(check_shapes, abstract_params)
    return jax.tree_util.tree_map_with_path(build, abstract_params)
