"""Collectives at the message sizes of the selected plans plus a sweep from 1 KiB, on every rank of the world.

Run under torchrun (`torchrun --nproc-per-node=N -m pytest collectives/`); conftest.py starts the process
group and parametrizes `collective` with the same cases, in the same order, on every rank.
"""


def test_collective(measure_collective, collective):
    measure_collective(collective)
