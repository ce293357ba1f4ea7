import os

# Triton kernels run in the CPU interpreter unless the GPU script asks for the real thing. This must
# happen before triton is imported anywhere.
if not os.environ.get("BRAID_GPU_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if os.environ.get("BRAID_GPU_TESTS") and torch.cuda.is_available() else "cpu"


# braid-bench's two shared CLI runs (tests/bench_common.py), once per session for every bench test file
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    import bench_common
    return bench_common.tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def braid_run(tmp_path_factory):
    import bench_common
    return bench_common.braid_run(tmp_path_factory)
