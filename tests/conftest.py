"""Shared pytest fixtures."""

import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def _stop_distributed_worker_pools():
    """Stop the gloo worker pools of megatron_irl.testing when the session ends
    (only if some test used them; importing the module here would cost a torch import)."""
    yield
    testing = sys.modules.get("megatron_irl.testing")
    if testing is not None:
        testing.shutdown_pools()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A checkpoint of the bundled tiny configuration with random weights, saved at TP=1
    (inference tests load it at their own layouts)."""
    from helpers import save_random_model

    from megatron_irl.testing import run_distributed

    directory = str(tmp_path_factory.mktemp("tiny_checkpoint") / "ckpt")
    run_distributed(save_random_model, 1, args=(directory,))
    return directory
