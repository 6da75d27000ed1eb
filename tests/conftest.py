"""Shared test settings: no network, quiet progress bars, a path to the shared real data."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder beside the checkout (`../shared/data`); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def glue_world(tmp_path_factory):
    """Tiny BERT/RoBERTa encoders and a few GLUE rows (:func:`tests.glue_helpers.build_world`), shared by the GLUE
    script tests of a session; tests write their own results elsewhere (``world.train_results`` and
    ``world.merge_results`` belong to tests/test_glue_scripts.py)."""
    from tests.glue_helpers import build_world
    from utils.glue_data_loader import load_raw_split

    load_raw_split.cache_clear()
    yield build_world(tmp_path_factory.mktemp("glue_world"))
    load_raw_split.cache_clear()


@pytest.fixture(scope="session")
def glue_trained(glue_world):
    """cola, stsb and rte fine-tuned from tiny-bert in ``glue_world.models`` (their test metrics by task)."""
    from tests.glue_helpers import train_tasks

    return train_tasks(glue_world)
