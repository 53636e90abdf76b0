"""Aligner tests run tiny models: the trainer tests' session fixture (one quiet thread) applies here too."""

from tests.trainer.conftest import _quiet_single_thread  # noqa: F401  - an autouse fixture, registered by import
