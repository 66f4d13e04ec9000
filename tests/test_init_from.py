"""init_from.py: a run starts from a workdir's or a Hugging Face folder's parameters, takes
their architecture and tokenizer except what the command line sets, trains at 4x the source's
context, and once it has a checkpoint resumes exactly from it."""

import os
import random
import re

import jax
import numpy as np
import pytest

import inference
import init_from
import train
from checkpoints import Checkpoints
from model import TransformerLM
from steps import setup_training
from tests.training import (check_sigkill_resume_is_exact, config_flags, restore_params, script,
                            tiny_config)

# End-to-end (the scripts run as processes, trained runs): out of the quick tier.
pytestmark = pytest.mark.slow


@pytest.fixture
def source(trained):
    """The shared tiny run (tests/conftest.py) at seq_len 64."""
    return trained["run"]


def test_a_workdir_source_gives_its_parameters_and_architecture(source, tmp_path):
    config = tiny_config(tmp_path / "cache", init_from=str(source), seq_len=256,
                         **{"model.window_size": 32, "model.d_model": 16})
    init_from.adopt_source_config(config, str(tmp_path / "run"),
                                  explicit={"seq_len", "model.window_size"})
    assert config.model.d_model == 32  # the source's, over the config file's value
    assert config.model.window_size == 32  # given on the command line: kept
    tokenizer = train.make_tokenizer(config.data)
    model_config = train.run_config.model_config(config, tokenizer)
    params = init_from.initial_params(config, setup_training(config, model_config), tokenizer)
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(restore_params(source)),
                            strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_another_shape_is_a_one_line_error(source, tmp_path):
    config = tiny_config(tmp_path / "cache", init_from=f"{source}@75", **{"model.mlp_dim": 48})
    with pytest.raises(ValueError, match=r"^init_from=.*@75: parameter \['layer_0'\]\['mlp'\]"
                                         r"\['down'\]\['kernel'\] has shape \(64, 32\) there; "
                                         r"this run's model needs \(48, 32\)$"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("value,message", [
    ("{tmp}/nothing", r"neither a workdir with checkpoints nor a Hugging Face model folder"),
    ("{source}@x", r"expected PATH or PATH@STEP"),
    ("{source}@77", r"step=77: no checkpoint for it in .* \(steps there: \[70, 75, 80\]\)"),
    ("{tmp}/gpt2", r"config.json: model_type='gpt2'; expected one of \['gemma2', "),
    ("{tmp}/gpt2@3", r"a Hugging Face folder has no steps; drop @3"),
])
def test_a_bad_source_is_one_line(source, tmp_path, value, message):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    config = tiny_config(tmp_path / "cache",
                         init_from=value.format(tmp=tmp_path, source=source))
    done = script("train.py", "--config=configs/tiny.py", *config_flags(config),
                  f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr[-2000:]
    assert re.search(message, done.stderr), done.stderr


def test_init_from_at_4x_context_trains_and_a_sigkill_resumes_exactly(source, tmp_path):
    """train.py's one SIGKILL-and-resume test: a run started from another (its parameters
    until its own first checkpoint), with dropout (whose keys must resume too)."""
    config = tiny_config(tmp_path / "cache", init_from=str(source), seq_len=256,
                         num_train_steps=12, checkpoint_every_steps=3, eval_every_steps=0,
                         sample_tokens=0, **{"model.dropout_rate": 0.1})
    expected = check_sigkill_resume_is_exact(config, tmp_path, 12,
                                             random.Random(os.getpid()).randint(4, 10))
    # It started from the source: its first loss is the source's level, not a random model's
    # ln(384) = 5.95.
    assert expected[1]["loss"] < 4.5, expected[1]
    saved = Checkpoints(str(tmp_path / "uninterrupted"), read_only=True).restore_config()[1]
    assert saved.seq_len == 256


def test_continue_a_gemma_3_at_4x_its_context_then_export_it(tmp_path, monkeypatch):
    """transformers' Gemma 3 (a sliding layer with its own RoPE base, window 16, and a global
    one; context 64; a tokenizer that adds a BOS) continued at 256 tokens with YaRN on the
    global layer only, then exported: transformers loads what was trained, as Gemma 3, with
    our logits. Its BOS begins every document of training and evaluation, and generation's
    prompt; the export keeps it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from data.pipeline import split_tokens
    from data.tokenizers import ByteTokenizer
    from hf.tokenizer import export_tokenizer
    from tests.hf.test_tokenizer import BOS, add_bos

    torch.manual_seed(0)
    source = tmp_path / "gemma3"
    transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        rms_norm_eps=1e-6, max_position_embeddings=64, eos_token_id=256, pad_token_id=257,
        bos_token_id=BOS)).save_pretrained(source)
    export_tokenizer(ByteTokenizer(), str(source), model_max_length=64)
    add_bos(str(source))

    config = tiny_config(tmp_path / "cache", num_train_steps=3, eval_every_steps=0,
                         sample_tokens=0, seq_len=256)
    run = tmp_path / "run"
    done = script("train.py", "--config=configs/tiny.py", *config_flags(config),
                  f"--config.init_from={source}", "--config.model.rope_scaling.rope_type=yarn",
                  "--config.model.rope_scaling.factor=4",
                  "--config.model.rope_scaling.original_max_position_embeddings=64",
                  f"--workdir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    saved = Checkpoints(str(run), read_only=True).restore_config()[1]
    assert (saved.model.d_model, saved.model.num_kv_heads, saved.model.window_size) == (64, 2, 15)
    assert (saved.model.hf_model_type, saved.model.rope_local_base) == ("gemma3_text", 10_000.0)
    assert saved.model.rope_scaling.factor == 4 and saved.model.scale_embeddings
    assert (saved.data.tokenizer, saved.data.hf_tokenizer) == ("hf", str(source))

    done = script("export.py", f"--workdir={run}", f"--output={tmp_path / 'out'}")
    assert done.returncode == 0, done.stderr[-2000:]
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    assert type(exported).__name__ == "Gemma3ForCausalLM"
    rope = exported.config.rope_parameters
    assert rope["full_attention"]["rope_type"] == "yarn" and rope["full_attention"]["factor"] == 4
    assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}
    loaded = inference.load_for_inference(str(run))
    tokens = np.random.RandomState(0).randint(0, 256, (1, 256))
    ours = jax.jit(TransformerLM(loaded.model_config).apply)({"params": loaded.params}, tokens)
    with torch.no_grad():
        theirs = exported(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4 * np.abs(theirs).max()

    # The BOS: every document of both splits begins with it, ...
    for split in ("train", "validation"):
        stream = np.asarray(split_tokens(loaded.config.data, split, loaded.tokenizer))
        starts = np.flatnonzero(stream[:-1] == 256) + 1
        assert stream[0] == BOS and (stream[starts] == BOS).all() and (stream == BOS).sum() == len(
            starts) + 1
    # ... generation's prompt (what sampling is given), ...
    prompts = []
    sample = inference.generate
    monkeypatch.setattr(inference, "generate", lambda params, prompt, *args, **kwargs: (
        prompts.append(np.asarray(prompt).tolist()) or sample(params, prompt, *args, **kwargs)))
    for text in ("ab", ""):
        inference.sample_text(loaded.params, loaded.model_config, loaded.tokenizer, text,
                              num_tokens=2, seed=0)
    assert prompts == [[[BOS, 97, 98]], [[BOS]]]
    # ... and the exported tokenizer and configs.
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reference("ab")["input_ids"] == [BOS, 97, 98]
    assert exported.config.bos_token_id == BOS and exported.generation_config.bos_token_id == BOS
