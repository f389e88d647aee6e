"""Everything that makes and trains a student: search spaces, timm students, the teacher and its outputs
cache, KD losses, datasets, the training loop, model files. Knows nothing of Optuna or MLflow."""
