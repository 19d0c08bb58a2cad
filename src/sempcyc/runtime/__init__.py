"""What the TorchServe archive ships, and nothing else: preprocessing (imaging), the extractor CNNs (backbones),
the SEM-PCYC networks (model), the inference path (encoder), ranking and metrics (retrieval), the gallery's
shard files (gallery_shards), the approximate index of large galleries (ann, through faiss) and the vectors its
short list is ranked against (served_vectors), the server-agnostic search (search) and the TorchServe adapter
(handler).

These modules import only each other (relatively) and the libraries a serving host has: the Python standard
library, torch, torchvision, numpy, pillow and faiss (and TorchServe's `ts` in the handler). The archive stage copies
this folder into the .mar as the package `sem_pcyc_runtime`; tests/test_architecture.py keeps the promise.
"""
from pathlib import Path

RUNTIME_DIR = Path(__file__).resolve().parent  # this folder: what the archive copies, and what embeddings depend on
