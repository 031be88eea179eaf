"""Fixtures shared by several test modules."""
import pytest

from scripts_server import Scripts


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """The fork server that runs the project's scripts (tests/scripts_server.py), one per module."""
    server = Scripts(tmp_path_factory.mktemp("scripts"))
    yield server
    server.close()
