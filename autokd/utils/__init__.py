"""Low-level helpers with no autokd concept of their own: atomic writes, file locks, torch devices."""
