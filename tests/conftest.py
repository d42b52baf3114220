"""Shared pytest setup: the repository root on sys.path, `gpu` tests skipped without CUDA, a small corpus."""
import os
import sys

import pytest
import torch

# Tests import the top-level modules (model.py, mla.py, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def corpus_args(tmp_path_factory):
    """train.py's --data and --cache_dir for a small generated corpus, one per test module."""
    from helpers import write_corpus
    return write_corpus(tmp_path_factory.mktemp("corpus"))
