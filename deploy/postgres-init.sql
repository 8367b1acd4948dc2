-- Run once by the postgres image on a fresh volume: MLflow gets POSTGRES_DB ("mlflow"), Optuna its own.
CREATE DATABASE optuna;
