"""Shared fixtures: tiny random GQA models and tiny offline tokenizers (no hub, seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# dvc.yaml as committed, read before any test runs `snakemake` in the project (which refreshes it)
DVC_YAML_AT_START = (PROJECT_ROOT / "dvc.yaml").read_text()


@pytest.fixture(scope="session")
def tokenizer():
    from pruneflow.tiny_models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not slow down when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def llama(tokenizer):
    from pruneflow.tiny_models import tiny_model

    return tiny_model("llama", vocab_size=len(tokenizer))


@pytest.fixture()
def token_ids(tokenizer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    return torch.randint(0, len(tokenizer), (4, 24), generator=generator)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama saved as a plain Hugging Face folder (config, safetensors, tokenizer)."""
    from pruneflow.tiny_models import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def staged_project(tmp_path_factory) -> Path:
    """The tiny project with real outputs up to the l2_magnitude model pruned at 0.3 (stages run in this
    process, MLflow off). Built once; tests copy it (`shutil.copytree`) before changing anything."""
    from .tiny_project import make_tiny_project, run_stages_in_process, set_param

    root = make_tiny_project(tmp_path_factory.mktemp("staged") / "project")
    set_param(root, "mlflow.enabled", False)
    run_stages_in_process(root, criteria=["l2_magnitude"], ratio=0.3)
    return root


def pytest_collection_modifyitems(config, items):
    """The slowest tests first (the whole-DAG runs, then the embedded model's golden check): with
    several workers (pytest-xdist, `--maxschedchunk=1` in scripts/test.sh) they start at once on
    different workers while the many short tests fill the gaps, instead of one DAG run starting last
    and keeping the whole suite waiting. The order within each group is the collection order."""
    def rank(item) -> int:
        if item.get_closest_marker("integration"):
            return 0
        return 1 if item.get_closest_marker("embedded") else 2

    items.sort(key=rank)  # stable
