"""SEM-PCYC zero-shot sketch-based image retrieval pipeline (one module per DVC stage)."""

__version__ = "0.1.0"
