"""The training loop, schedules, checkpoints, logging and the ``train``/``demo`` commands."""
