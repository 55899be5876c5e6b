"""`python -m pipeline ...` = `narvl ...` (what a submitted job runs: its working_dir comes first on sys.path)."""

from pipeline.cli import app

app(prog_name="narvl")
