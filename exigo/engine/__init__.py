"""The run's machinery, under `exigo.pipeline`'s epoch loop.

- `world`: one process or torchrun's processes, behind one interface; devices and threads.
- `session`: the run's parts (model, optimizer, schedule, probe) and how it starts or resumes.
- `epoch`: the steps of an epoch (fit, then finish = analyse + commit) and the background
  thread that finishes an epoch while the next one trains.
- `training`: one epoch of training, one evaluation pass.
- `checkpoint`: `best.pt` / `last.pt`, random-number states.
- `run_dir`: the save directory (lock, `run.json`, `metrics.json`, the previous run set aside).
- `preflight`: one trial training step before anything of a previous run is replaced.
- `resume`: what `--resume` restores and checks.
- `signals`: SIGINT / SIGTERM turned into a stop at the next safe point.
- `events`: TensorBoard scalars and images.
- `budget`: the analyses' cost against the epoch's training (`--analysis-budget`).
- `console`: the run's closing line.
"""
