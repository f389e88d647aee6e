"""Low-level helpers with no autokd concept of their own: atomic writes, append-only files, file locks, torch devices."""
