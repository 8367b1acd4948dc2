"""Operations around the ML core: experiment tracking (MLflow), tuning (Optuna), S3 storage,
the local service stack (PostgreSQL, SeaweedFS, mlflow server) and the MLflow UI check.

The core (``atric.model``, ``atric.engine``, ``atric.data``, ...) never imports from here.
"""
