"""The config cache: SQLAlchemy store, shipped caches and the call-time loader."""
