"""Prefect flows: one per DVC stage (what ``ulmfit <stage>`` runs), plus ``retrain``.

Each flow is plain Python composing thin tasks from ``tasks/``; DVC decides what runs and
caches what comes out, so Prefect keeps no results (``persist_result=False``, no task cache).
"""
