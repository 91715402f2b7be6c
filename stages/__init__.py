"""stillhouse pipeline stages: one module per DVC stage (`python -m stages.<name>`), plus shared helpers."""
