"""Scaling-law toolkit: eval records, law forms and fits, FLOPs accounting, compute-optimal planning, sweeps, plots."""
