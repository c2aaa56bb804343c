"""Thin Prefect tasks: read a params section, seed, call ``ulmfit``, write outputs atomically,
log to MLflow, return paths. Imports point one way: ``flows -> tasks -> ulmfit``."""
