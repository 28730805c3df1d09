"""Owns the engine: config, model store, engine lifecycle, sessions, metrics, the server."""
