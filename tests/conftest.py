"""Fixtures shared by several test modules."""
import pytest

from scripts_server import Scripts


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """The fork server that runs the project's scripts (tests/scripts_server.py), one per module."""
    server = Scripts(tmp_path_factory.mktemp("scripts"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def darknet(tmp_path_factory):
    """Darknet's C implementation built once per session (tests/darknet_ref.py), or a skip
    that says why it cannot be built here."""
    from darknet_ref import DarknetUnavailable, build_darknet

    try:
        return build_darknet(tmp_path_factory.mktemp("darknet-build"))
    except DarknetUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: waking a second intra-op thread costs more than it saves."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
