"""The recipes' helpers (YAML/CLI parsing, data loading, reports, the demo data): used by ``recipes/``, not by the library."""
