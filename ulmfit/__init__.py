"""ULMFiT (Howard & Ruder, 2018) as a plain PyTorch library.

Importing ``ulmfit`` loads neither Prefect, MLflow nor DVC: the pipeline in ``tasks/`` and
``flows/`` builds on this package, never the other way round.
"""

__version__ = "0.1.0"
