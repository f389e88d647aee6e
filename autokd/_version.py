"""autokd's version, in a module of its own so that any module can read it without importing the package's
public entry points (``autokd/__init__.py`` imports lazily from the packages, never the other way round)."""
__version__ = "0.1.0"
