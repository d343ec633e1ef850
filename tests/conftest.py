import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without CUDA (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def one_thread_session():
    """The whole test session runs tiny models with one torch thread (see ``one_thread``); tests that need
    more set it themselves. Restored at the end."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: as fast as two, and immune to oversubscription when
    other processes share the cores (two OpenMP threads on busy cores made such tests ~20x slower).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
