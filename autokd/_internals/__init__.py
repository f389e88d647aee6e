"""The private Optuna and timm names autokd relies on, each pinned by a test (tests/test_optuna_internals.py, tests/test_timm_internals.py)."""
