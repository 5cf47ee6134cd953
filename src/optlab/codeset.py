"""Which code under src/optlab training runs execute, in one place.

Everything but :data:`TRAINING_CODE_EXCLUDE` (paths relative to src/optlab; a trailing ``/``
names a package): the analysis and report code, the cross-machine robustness check, the
``make repro`` driver with its warm process, and the SLURM launcher (which runs slices as their
stages do, through code that is fingerprinted). Two things read it: stage ``validate``'s training
code fingerprint (optlab.pipeline: an edit of an excluded file reruns no training stage) and the
frozen phase's code check (optlab.tracking.policy: a frozen study stays frozen across such
edits). Standard library only."""

TRAINING_CODE_EXCLUDE = ("analysis/", "robustness.py", "repro.py", "zygote.py", "screenshots.py", "launch.py")


def frozen_code_exclude(prefix: str = "src/optlab/") -> tuple[str, ...]:
    """The same paths relative to the repository root, as git pathspecs."""
    return tuple(prefix + p.rstrip("/") for p in TRAINING_CODE_EXCLUDE)
