"""Data configs for tests: a token cache in a temporary folder."""

import pytest

from configs.data import get_config


@pytest.fixture
def data_config(tmp_path):
    config = get_config()
    config.cache_dir = str(tmp_path / "cache")
    return config
