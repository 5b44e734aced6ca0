"""Shared pytest setup."""

import os
import warnings

# Nothing in the test suite may reach the Hugging Face Hub. huggingface_hub reads this once, at import,
# so it must be set before any test module imports diffusers / transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """Tiny models and oracles gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waits made single pipeline calls take seconds instead of ~0.2 s: run the suite single-threaded."""
    threads = torch.get_num_threads()
    # DIFFUSERS_ZTSNR_TEST_THREADS=2 runs the suite as a multi-threaded user would (other reduction orders)
    torch.set_num_threads(int(os.environ.get("DIFFUSERS_ZTSNR_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quiet_loading():
    """Silences diffusers' and transformers' loading chatter for a module of training runs
    (``pytestmark = pytest.mark.usefixtures("quiet_loading")``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
