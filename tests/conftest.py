"""Shared fixtures. Ray start-up dominates test time on two cores, so one local Ray
instance serves the whole session; tests that need their own cluster start it themselves."""

from __future__ import annotations

import logging
import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by every test in the session (2 CPUs, no dashboard)."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()
