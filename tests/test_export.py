"""export.py: a trained run as a Hugging Face folder that transformers loads with our logits,
our greedy continuation and our token ids; bad input is one line and writes nothing."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inference
from data.sources import read_documents
from model import TransformerLM
from tests.training import script

# End-to-end (the scripts run as processes, trained runs): out of the quick tier.
pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The shared tiny run (tests/conftest.py: enough steps to write more than spaces) and its
    export: ``{"run", "hf"}``."""
    hf = tmp_path_factory.mktemp("export") / "hf"
    done = script("export.py", f"--workdir={trained['run']}", f"--output={hf}")
    assert done.returncode == 0, done.stderr[-2000:]
    return {"run": trained["run"], "hf": hf}


def test_transformers_gives_our_logits_greedy_tokens_and_ids(exported):
    run = inference.load_for_inference(str(exported["run"]))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported["hf"]).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported["hf"])
    documents = list(read_documents(run.config.data, "validation"))
    assert documents
    for text in documents[:3]:  # our ids from its tokenizer, and our logits beyond the window
        ids = run.tokenizer.encode(text[:400])
        assert hf_tokenizer(text[:400])["input_ids"] == ids.tolist()
        ours = jax.jit(TransformerLM(run.model_config).apply)({"params": run.params},
                                                              jnp.asarray(ids)[None])
        with torch.no_grad():
            theirs = hf_model(torch.tensor(ids)[None]).logits.numpy()
        assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4 * np.abs(theirs).max()

    prompt = "def "
    generated = script("generate.py", f"--workdir={exported['run']}", f"--prompt={prompt}",
                       "--temperature=0", "--max_new_tokens=50")
    assert generated.returncode == 0, generated.stderr[-2000:]
    ours = generated.stdout.split("---\n", 1)[1].rstrip("\n")
    prompt_ids = torch.tensor(hf_tokenizer(prompt)["input_ids"])[None]
    with torch.no_grad():
        tokens = hf_model.generate(prompt_ids, max_new_tokens=50, do_sample=False,
                                   eos_token_id=hf_tokenizer.eos_token_id)
    theirs = prompt + hf_tokenizer.decode(tokens[0, prompt_ids.shape[1]:],
                                          skip_special_tokens=True)
    assert len(tokens[0]) - prompt_ids.shape[1] == 50 or tokens[0, -1] == hf_tokenizer.eos_token_id
    assert ours == theirs and len(set(ours[len(prompt):])) > 3, ours  # not one repeated byte


def test_bad_input_is_one_line_and_writes_nothing(exported, tmp_path):
    (tmp_path / "mine.partial").mkdir()  # the user's own folder, by chance so named
    (tmp_path / "mine.partial" / "notes.txt").write_text("mine")
    for flags, message in [
        ([f"--workdir={exported['run']}", f"--output={exported['hf']}"], "it exists"),
        ([f"--workdir={tmp_path / 'none'}", f"--output={tmp_path / 'out'}"], "has no checkpoints"),
        ([f"--workdir={exported['run']}", f"--output={tmp_path / 'out'}", "--step=7"],
         "no checkpoint for it"),
        ([f"--workdir={exported['run']}", "--output="], "--output is empty"),
        ([f"--workdir={exported['run']}", f"--output={tmp_path / 'mine'}"],
         f"{tmp_path / 'mine.partial'} exists and is not a killed export's"),
    ]:
        done = script("export.py", *flags)
        assert done.returncode == 1 and done.stderr.startswith("error: "), done.stderr[-2000:]
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert not os.path.exists(tmp_path / "out")
    assert (tmp_path / "mine.partial" / "notes.txt").read_text() == "mine"
    # A killed export's leftovers (marked as such) give way to the next export.
    (tmp_path / "killed.partial").mkdir()
    (tmp_path / "killed.partial" / ".export-in-progress").touch()
    done = script("export.py", f"--workdir={exported['run']}", f"--output={tmp_path / 'killed'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not os.path.exists(tmp_path / "killed.partial")
    assert sorted(os.listdir(tmp_path / "killed")) == sorted(os.listdir(exported["hf"]))
