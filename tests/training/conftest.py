import pytest


@pytest.fixture(scope="session")
def prefix_shards(tmp_path_factory):
    """A preprocessed 60 kB prefix of the embedded corpus, shared by the in-process pretraining tests."""
    from pretrain_support import preprocess_prefix

    return preprocess_prefix(tmp_path_factory.mktemp("prefix-shards"))
