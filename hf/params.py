"""Parameters between this project's tree and Hugging Face's Mistral/Llama tensor names.

Each of our parameters is one tensor of the Hugging Face layout per layer, transposed and
reshaped (torch's ``Linear`` keeps ``(out, in)``; our kernels ``(in, heads, head_dim)`` and
``(heads, head_dim, out)``). Queries and keys need no permutation: both rotate halves
(`model.rope.apply_rotary`; Meta's original checkpoints, which interleave pairs, would).

Our input embeddings may be scaled by ``sqrt(d_model)`` (``model.scale_embeddings``, Gemma's
scheme); Mistral's are not. Export folds the scale into the embedding table, and where the
table is also the output projection (tied), divides the final norm's scale by it, so that
the logits are unchanged: the exported model computes the same function with
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

import jax
import numpy as np
from safetensors import safe_open

from errors import UserError
from model.config import TransformerConfig

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# Tensors of a Hugging Face checkpoint that hold no parameter: RoPE's inverse frequencies,
# which older Llama checkpoints saved.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_tensors(config: TransformerConfig):
    """``(hf name in layer, our path in a layer, hf -> ours, ours -> hf)`` for each tensor."""
    d, heads, kv_heads = config.d_model, config.num_heads, config.resolved_num_kv_heads
    head_dim = config.resolved_head_dim

    def projection(count):  # (count * head_dim, d) <-> (d, count, head_dim)
        return (lambda w: w.T.reshape(d, count, head_dim),
                lambda k: k.reshape(d, count * head_dim).T)

    transpose = (lambda w: w.T, lambda k: k.T)
    same = (lambda w: w, lambda k: k)
    return [
        ("self_attn.q_proj.weight", ("attention", "query", "kernel"), *projection(heads)),
        ("self_attn.k_proj.weight", ("attention", "key", "kernel"), *projection(kv_heads)),
        ("self_attn.v_proj.weight", ("attention", "value", "kernel"), *projection(kv_heads)),
        ("self_attn.o_proj.weight", ("attention", "out", "kernel"),
         lambda w: w.T.reshape(heads, head_dim, d), lambda k: k.reshape(heads * head_dim, d).T),
        ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), *transpose),
        ("mlp.up_proj.weight", ("mlp", "up", "kernel"), *transpose),
        ("mlp.down_proj.weight", ("mlp", "down", "kernel"), *transpose),
        ("input_layernorm.weight", ("attention_norm", "scale"), *same),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), *same),
    ]


def _embedding_scale(config: TransformerConfig) -> np.float32:
    """What export multiplies the embedding table by: our input scale, folded in."""
    return np.sqrt(np.float32(config.d_model)) if config.scale_embeddings else np.float32(1)


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
        for name, path, _, to_hf in _layer_tensors(config):
            if config.scan_layers:
                tensor = leaf(params, ("layers", *path))[layer]
            else:
                tensor = leaf(params, (f"layer_{layer}", *path))
            yield f"model.layers.{layer}.{name}", np.ascontiguousarray(to_hf(tensor))
    final_scale = leaf(params, ("final_norm", "scale"))
    yield "model.norm.weight", final_scale / scale if config.tie_embeddings else final_scale
    if not config.tie_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(leaf(params, ("logits", "kernel")).T)


class TensorFiles:
    """The tensors of a Hugging Face folder's ``model.safetensors`` or of the shards that
    ``model.safetensors.index.json`` lists, read one at a time.

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

    def _open(self, file: str):
        path = os.path.join(self.folder, file)
        try:
            return safe_open(path, framework="numpy")
        except Exception as error:  # safetensors raises its own types for a bad file
            raise UserError(f"{path}: cannot read it as safetensors ({error})") from None

    def names(self) -> set[str]:
        return set(self.file_of)

    @contextlib.contextmanager
    def _file_holding(self, name: str):
        """The open file that the index places ``name`` in, checked to hold it: a header or
        tensor access raises safetensors' own error (a traceback) for a name it lacks."""
        file = self.file_of[name]
        with self._open(file) as f:
            if name not in f.keys():
                raise UserError(f"{os.path.join(self.folder, file)} lacks the tensor {name} "
                                f"that {_INDEX} places there")
            yield f

    def shape(self, name: str) -> tuple[int, ...]:
        with self._file_holding(name) as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as float32; the file is opened for it alone, so that its pages
        leave memory with it."""
        with self._file_holding(name) as f:
            return f.get_tensor(name).astype(np.float32, copy=False)


def _our_leaves(config: TransformerConfig) -> dict[tuple, tuple[list[str], Callable, Callable]]:
    """Each of our parameter paths -> (the Hugging Face names it is built from, in layer order;
    how to build it from those tensors, read by a function of a name; how one layer's slice
    of it maps to a Hugging Face tensor, up to scale: what gives the shape each name needs)."""
    scale = _embedding_scale(config)
    same = lambda k: k  # noqa: E731
    leaves = {
        ("embed", "embedding"): (["model.embed_tokens.weight"],
                                 lambda read, names: read(names[0]) / scale, same),
        ("final_norm", "scale"): (["model.norm.weight"], lambda read, names: read(names[0])
                                  * (scale if config.tie_embeddings else 1), same),
    }
    if not config.tie_embeddings:
        leaves[("logits", "kernel")] = (["lm_head.weight"], lambda read, names: read(names[0]).T,
                                        lambda k: k.T)
    for name, path, to_ours, to_hf in _layer_tensors(config):
        names = [f"model.layers.{layer}.{name}" for layer in range(config.num_layers)]
        if config.scan_layers:
            leaves[("layers", *path)] = (names, lambda read, names, to_ours=to_ours: np.stack(
                [to_ours(read(n)) for n in names]), to_hf)
        else:
            for layer, hf_name in enumerate(names):
                leaves[(f"layer_{layer}", *path)] = (
                    [hf_name], lambda read, names, to_ours=to_ours: to_ours(read(names[0])),
                    to_hf)
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
    wanted = {name for names, _, _ in leaves.values() for name in names}
    spare = sorted(name for name in files.names() - wanted
                   if not name.endswith(_IGNORED_SUFFIXES)
                   and not (config.tie_embeddings and name == "lm_head.weight"))
    if spare:
        raise UserError(f"{folder}: tensor {spare[0]} has no place in this model (a "
                        f"Mistral/Llama-shaped model has no biases or extra norms)")
    missing = sorted(wanted - files.names())
    if missing:
        raise UserError(f"{folder}: tensor {missing[0]} is missing")

    def key_path(path):
        return tuple(getattr(key, "key", key) for key in path)

    def check_shapes(path, abstract):  # every header before any tensor is read
        names, _, to_hf = leaves[key_path(path)]
        layer_shape = abstract.shape[1:] if path[0].key == "layers" else abstract.shape
        expected = jax.eval_shape(to_hf, jax.ShapeDtypeStruct(layer_shape, np.float32)).shape
        for name in names:
            if files.shape(name) != expected:
                raise UserError(f"{folder}: tensor {name} has shape {files.shape(name)}; this "
                                f"model needs {expected} (from its model.* config)")

    def build(path, abstract):
        names, convert, _ = leaves[key_path(path)]
        tensor = convert(files.read, names)
        return jax.make_array_from_callback(abstract.shape, abstract.sharding,
                                            lambda index: tensor[index])

    jax.tree_util.tree_map_with_path(check_shapes, abstract_params)
    return jax.tree_util.tree_map_with_path(build, abstract_params)
