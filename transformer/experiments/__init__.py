"""The claims of the lecture notes (and the paper) as experiments, one module per claim.

Each module has `run(preset, out_dir, context) -> Result`; `transformer.report` runs them in this order and
writes the report. `EXPERIMENTS` maps a key (`transformer report --only KEY`) to its module's name.
"""

EXPERIMENTS: dict[str, str] = {
    "cost": "transformer.experiments.cost",
    "paths": "transformer.experiments.paths",
    "scaling": "transformer.experiments.scaling",
    "projections": "transformer.experiments.projections",
    "positional": "transformer.experiments.positional",
    "heads": "transformer.experiments.heads",
    "masking": "transformer.experiments.masking",
    "warmup": "transformer.experiments.warmup",
    "alignment": "transformer.experiments.alignment",
}
