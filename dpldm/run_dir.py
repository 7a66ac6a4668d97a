"""The layout of a run directory: one module names its files and says which of them may be published.

    run = RunDir("runs/eps10")
    run.config, run.ledger, run.classes, run.adapter, run.samples, run.checkpoints, run.private

A fine-tune's directory (pretraining writes the same `config.yaml` / `checkpoints/` / `samples/`):

| path | what | publish? |
|---|---|---|
| `config.yaml` | the resolved config (`seed: null` for a secret-seeded run) | yes |
| `privacy.json` | the ledger: ε, δ, relation, σ, q, steps, warnings (dpldm/privacy/ledger.py) | yes |
| `adapter/` | the DP-trained adapter weights + adapter_config.json | yes |
| `samples/` | synthetic images, grid, shards, samples.json | yes |
| `report/` | report.md / report.json / figures | yes |
| `classes.json` | class names + prompt template of the run, and their `source` | if source is config/pipeline |
| `checkpoints/` | trainable weights, optimizer and sampler state, EMA: resume state | never |
| `private/` | the secret run seed (dpldm/privacy/run_seed.py) | never |
| `latent_cache/` | the encoded private images (when data.cache_dir is unset) | never |

docs/privacy.md's release checklist is the user-facing version of this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
LEDGER = "privacy.json"
CLASSES = "classes.json"
ADAPTER = "adapter"
SAMPLES = "samples"
SAMPLES_META = "samples.json"      # inside samples/
REPORT = "report"
CHECKPOINTS = "checkpoints"
PRIVATE = "private"
LATENT_CACHE = "latent_cache"

PUBLISHABLE = (CONFIG, LEDGER, ADAPTER, SAMPLES, REPORT)
NEVER_PUBLISH = (CHECKPOINTS, PRIVATE, LATENT_CACHE)


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    config = property(lambda self: self.path / CONFIG)
    ledger = property(lambda self: self.path / LEDGER)
    classes = property(lambda self: self.path / CLASSES)
    adapter = property(lambda self: self.path / ADAPTER)
    samples = property(lambda self: self.path / SAMPLES)
    samples_meta = property(lambda self: self.path / SAMPLES / SAMPLES_META)
    report = property(lambda self: self.path / REPORT)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    private = property(lambda self: self.path / PRIVATE)
    latent_cache = property(lambda self: self.path / LATENT_CACHE)
