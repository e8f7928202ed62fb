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


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """kind -> the folder of a tiny random Hugging Face causal LM of that architecture with its own
    locally trained tokenizer (helpers.save_tiny_hf), built once per session."""
    pytest.importorskip("transformers")
    from helpers import save_tiny_hf

    folders = {}

    def folder(kind: str) -> str:
        if kind not in folders:
            folders[kind] = save_tiny_hf(kind, tmp_path_factory.mktemp(f"hf-{kind}"))
        return folders[kind]

    return folder
