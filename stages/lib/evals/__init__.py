"""Judge-free evaluations: benchmarks scored by programs, not by a model (IFEval in `ifeval`)."""
