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
