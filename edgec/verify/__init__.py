"""Golden sets, metrics, gates and reports. Importable without torch."""
