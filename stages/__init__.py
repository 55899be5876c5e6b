"""Pipeline stages. Each module exposes `run(cfg, inputs, out_dir, log) -> dict` and nothing runs at import."""
