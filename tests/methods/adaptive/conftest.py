"""Fixtures of the adaptive-width tests: the two CPU paths of the layer rescaling."""

import os
import shutil

import pytest

from widthlab.methods.adaptive import cpu_kernel


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
