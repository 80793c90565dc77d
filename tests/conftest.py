"""Test isolation: a command run in-process (cli.main) hands its --config-dir, --config-name, lock
holder and Hub-offline choice to the processes it starts through the environment; none of that
may leak into the next test."""

from __future__ import annotations

import os

import pytest

from mistral_tune import cli_args
from mistral_tune.lock import HOLDER_ENV

INHERITED = (cli_args.CONFIG_DIRS_ENV, cli_args.CONFIG_NAME_ENV, HOLDER_ENV, "HF_HUB_OFFLINE")


@pytest.fixture(autouse=True)
def _command_environment_does_not_leak():
    saved = {k: os.environ.get(k) for k in INHERITED}
    search_dirs = list(cli_args._SEARCH_DIRS)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    cli_args._SEARCH_DIRS[:] = search_dirs
