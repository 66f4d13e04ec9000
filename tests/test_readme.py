"""README.md's Python examples run, and include the seed library's examples verbatim."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEED_README = ROOT.parent / "shared" / "seed" / "local_attention_flax_README.md"


def _code_blocks(path: pathlib.Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(_code_blocks(ROOT / "README.md", "python"))))
def test_readme_python_block_runs(index):
    block = _code_blocks(ROOT / "README.md", "python")[index]
    exec(compile(block, f"README.md python block {index}", "exec"), {})


def test_readme_carries_the_seed_examples_verbatim():
    if not SEED_README.exists():
        pytest.skip(f"the seed README is not beside this checkout ({SEED_README})")
    seed_blocks = [b.strip() for b in _code_blocks(SEED_README, "") if "jax" in b]
    assert len(seed_blocks) == 2
    ours = _code_blocks(ROOT / "README.md", "python")
    for seed_block in seed_blocks:
        assert any(seed_block in block for block in ours), seed_block[:80]
