import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: a saved tiny HF directory (with tokenizer) and its torch model, cached per config name."""
    from helpers import save_tiny_model

    cache = {}

    def make(name: str = "llama"):
        if name not in cache:
            directory = tmp_path_factory.mktemp(name)
            cache[name] = (directory, save_tiny_model(name, directory))
        return cache[name]

    return make
