"""The private Optuna and timm names autokd relies on, each pinned by a test (tests/_internals/)."""
