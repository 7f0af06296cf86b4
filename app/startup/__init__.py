"""What happens before the first request, made visible: the weights fetched into the Hugging Face cache,
loaded onto the device, the engine warmed up; each phase logged with its progress and its duration, and
named by /readyz while it runs. `medmo-serve --download-only` and `--check` are built from the same parts.

- `progress.py`: the phases, what /readyz reads, and the progress bars (tqdm on a terminal, JSON lines
  otherwise).
- `weights.py`: MEDMO_MODEL as a folder to load: found in the cache, or downloaded with per-file and
  total progress.
- `checks.py`: settings, device, dtype, attention and weights, checked offline, one line each.
"""
