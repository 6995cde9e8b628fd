"""The run's machinery, under `exigo.pipeline`'s epoch loop.

- `world`: one process or torchrun's processes, behind one interface.
- `training`: one epoch of training, one evaluation pass.
- `checkpoint`: `best.pt` / `last.pt`, random-number states.
- `run_dir`: the save directory (lock, `run.json`, `metrics.json`, replacing a previous run).
- `resume`: what `--resume` restores and checks.
- `signals`: SIGINT / SIGTERM turned into a stop at the next safe point.
- `events`: TensorBoard scalars and images.
"""
