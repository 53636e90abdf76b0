"""What a launcher (torchrun, accelerate launch) tells each process through its environment, read without
importing torch (the CLI prints its one-line errors through this before torch may have loaded)."""

from __future__ import annotations

import os


def launched_world_size() -> int:
    """The number of processes a launcher started; 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1
