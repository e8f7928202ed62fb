import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test builds streams into one session-wide temporary cache, never the user's."""
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path_factory.getbasetemp() / "stream-cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every model in the suite is tiny: one intra-op thread is fastest on a 2-core machine and
    immune to oversubscription when the suite's own subprocesses run beside it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

