"""In-process stand-ins for a process killed mid-run (kill -9) in the trainer's tests."""

from __future__ import annotations

import pytest


class Killed(Exception):
    """Stands for kill -9: nothing in the trainer catches it, so no cleanup runs."""


def train_until_killed(trainer, micro_batch: int) -> None:
    """Run ``trainer.train()`` until it asks for micro-batch ``micro_batch`` (counted from 0 over
    the whole run), where the process "dies" (:class:`Killed`): what is on disk then is what a
    kill -9 during that optimizer step leaves."""
    original = trainer._micro_batch

    def dying(index):
        if index >= micro_batch:
            raise Killed()
        return original(index)

    trainer._micro_batch = dying
    with pytest.raises(Killed):
        trainer.train()
