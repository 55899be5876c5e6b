"""Orchestration: Ray DAG over the stages, stage cache, MLflow tracking, Tune sweeps, the `narvl` CLI."""
