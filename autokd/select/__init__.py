"""Pure selection logic: the Pareto front, knee, hypervolume, recommendations and the rung pruner (no I/O)."""
