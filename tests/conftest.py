"""Shared test fixtures: small in-memory tasks built here, independent of the data package."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch.utils.data import TensorDataset

from widthlab.data.base import TaskData
from widthlab.methods.adaptive import cpu_kernel


def make_blobs_task(n: int = 256, d: int = 8, classes: int = 3, seed: int = 0) -> TaskData:
    """Gaussian blobs around random class centres: learnable in a few epochs by a small MLP."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, d, generator=g)

    def draw(m: int):
        y = torch.randint(0, classes, (m,), generator=g)
        x = centres[y] + torch.randn(m, d, generator=g)
        return TensorDataset(x, y)

    return TaskData("blobs", "classification", draw(n), draw(n // 4), draw(n // 4), (d,), classes)


def make_regression_task(n: int = 128, d: int = 4, seed: int = 0) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, 1, generator=g)

    def draw(m: int):
        x = torch.randn(m, d, generator=g)
        return TensorDataset(x, x @ w + 0.01 * torch.randn(m, 1, generator=g))

    return TaskData("linreg", "regression", draw(n), draw(n // 4), draw(n // 4), (d,), 1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one thread: the tensors are tiny, and on a shared 2-core machine extra
    intra-op threads only oversubscribe the cores. Subprocess tests set their own."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def blobs() -> TaskData:
    return make_blobs_task()


# ----------------------------------------------------------------- the adaptive layers' two CPU paths


def require_kernel():
    """Load the compiled CPU kernel, failing the test if it does not build; skip only where it cannot
    be built at all (no C++ compiler) or the user switched it off."""
    if not cpu_kernel.enabled():
        pytest.skip(f"{cpu_kernel.ENV_SWITCH} is off")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the adaptive-width CPU kernel cannot be built here")
    return cpu_kernel.load(strict=True)


@pytest.fixture
def kernel():
    return require_kernel()


@pytest.fixture(params=["kernel", "pytorch"])
def cpu_path(request):
    """Run a test on both CPU paths: the compiled kernel (cpu_kernel.cpp) and PyTorch operations."""
    if request.param == "kernel":
        require_kernel()
        yield "kernel"
    else:
        with cpu_kernel.disabled():
            yield "pytorch"
