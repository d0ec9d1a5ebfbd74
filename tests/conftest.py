"""Shared pytest fixtures: the embedded model, loaded once per session.

BIASGYM_CACHE is left as the user has it (default: ~/.cache/biasgym), so the tests use the
same converted model as the book and never convert it twice.
"""

import pytest


# The per-test limit (pyproject.toml's ``timeout``) is minutes; a test that builds the whole
# book (every chapter in the quick profile, ~10 minutes on 2 idle cores, twice that loaded)
# gets this many seconds instead: it is the first user of the ``built_book`` fixture that
# pays for the build.
BOOK_TIMEOUT = 3600


def pytest_configure(config):
    # Also declared in pyproject.toml; registered here so the marker exists whatever the rootdir.
    config.addinivalue_line("markers", "slow: loads the real embedded model or executes notebooks")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "built_book" in getattr(item, "fixturenames", ()) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(BOOK_TIMEOUT))


@pytest.fixture(scope="session")
def embedded():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct, loaded once per session."""
    from biasgym_lib.errors import ModelNotAvailable
    from biasgym_lib.models import EMBEDDED_WHEEL, load_model

    try:
        return load_model()
    except ModelNotAvailable as exc:
        pytest.skip(f"embedded model not available ({EMBEDDED_WHEEL} not installed?): {exc}")


@pytest.fixture(scope="session")
def smol_tokenizer(embedded):
    """A fresh copy of the embedded model's tokenizer (tests may add <TOKEN> to it)."""
    import copy

    return copy.deepcopy(embedded[1])


@pytest.fixture
def tiny_with_tokenizer(smol_tokenizer):
    """Factory: a tiny random model of a family whose vocabulary matches SmolLM2's, so the
    real tokenizer (chat template, <TOKEN>) drives it. Fast: a few million parameters."""
    from biasgym_lib.models import tiny_model

    def make(family="llama", seed=0, tied=True):
        return tiny_model(family, seed=seed, vocab_size=49152, tied=tied)

    return make
