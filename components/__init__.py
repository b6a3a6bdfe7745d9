"""adaptad's science layer: data, backbones, methods, feature banks, metrics.

Never imports prefect, ray, mlflow or dvc (DESIGN.md layer rule, checked by import-linter).
"""
