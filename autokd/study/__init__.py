"""The record of a study and its trials (every attribute key, the trial state and its Optuna mapping,
finishing a trial, readers), its storage and lock, worker liveness, and sharing a study across machines."""
