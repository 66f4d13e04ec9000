"""The Python examples of README.md and docs/*.md run, and include the seed library's examples
verbatim."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEED_README = ROOT.parent / "shared" / "seed" / "local_attention_flax_README.md"
# README.md, then every page under docs/, in a fixed order.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_blocks(path: pathlib.Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.DOTALL)


def _python_blocks() -> list[tuple[str, str]]:
    """(name, code) of every ```python block of the pages, named `page:i` (0-based)."""
    return [(f"{page.relative_to(ROOT)}:{index}", block)
            for page in PAGES
            for index, block in enumerate(_code_blocks(page, "python"))]


_BLOCKS = _python_blocks()


@pytest.mark.parametrize("name, block", _BLOCKS, ids=[name for name, _ in _BLOCKS])
def test_python_block_runs(name, block):
    exec(compile(block, name, "exec"), {})


def test_readme_or_docs_carry_the_seed_examples_verbatim():
    # A page moved or a fence mistyped must not leave the examples silently untested.
    assert (ROOT / "docs").is_dir() and len(_BLOCKS) >= 2, [page.name for page in PAGES]
    if not SEED_README.exists():
        pytest.skip(f"the seed README is not beside this checkout ({SEED_README})")
    seed_blocks = [b.strip() for b in _code_blocks(SEED_README, "") if "jax" in b]
    assert len(seed_blocks) == 2
    ours = [block for _, block in _BLOCKS]
    for seed_block in seed_blocks:
        assert any(seed_block in block for block in ours), seed_block[:80]
