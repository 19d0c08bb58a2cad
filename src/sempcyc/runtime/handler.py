"""TorchServe handler: a thin adapter from TorchServe's request batches to search.SketchSearch.

In the archive this file sits at the root beside `sem_pcyc_runtime/`, the archive's copy of this runtime package,
and imports from it by that name (so it is only ever imported from an archive); it never imports the installed
`sempcyc` package, so a serving host needs only TorchServe, torch, torchvision, numpy, pillow and faiss-cpu. The
model and the gallery embeddings are loaded once in initialize(), from the archive or, for the large files a
deployed slim archive leaves out, from the blob store its serving.json names (every file checked against its
sha256; a missing or damaged one fails the load). A host whose TorchServe Python lacks faiss fails there too, with
one line naming the package and version (the module itself imports without it, so TorchServe reports that line
instead of a failed import of its default handlers). Each call of handle() is one TorchServe batch (up to the
model's batchSize requests, waited for at most maxBatchDelay): its sketches go through one forward pass and one
search, and every request gets its own answer or its own 4xx error.
"""
import json
import os
from pathlib import Path

import torch
from sem_pcyc_runtime.ann import require_faiss, set_threads
from sem_pcyc_runtime.search import RequestError, SketchSearch

# No content type (curl -T) is fine too. Form encoding is refused: TorchServe parses such a body as form fields,
# so the image would arrive mangled (curl --data-binary sends it unless told -H 'Content-Type: image/png').
ACCEPTED_TYPES = ("image/", "application/octet-stream")


class SemPcycHandler:
    """Request: raw sketch bytes. Response: [{"image": "<class>/<file>", "class": ..., "score": ...}, ...]."""

    def __init__(self):
        self.search = None
        self.initialized = False

    def initialize(self, context):
        model_dir = Path(context.system_properties["model_dir"])
        settings = json.loads((model_dir / "serving.json").read_text(encoding="utf-8"))
        require_faiss(settings.get("faiss_version", ""))  # every serving host has it, whatever the gallery's size
        threads = int(os.environ.get("SEM_PCYC_THREADS", settings.get("threads", 0)) or 0)
        if threads > 0:
            torch.set_num_threads(threads)
            set_threads(threads)
        # a deployed (slim) archive carries no model or shard files: serving.json names the host's blob store
        self.search = SketchSearch.load(model_dir / "sem_pcyc.pt", model_dir / "gallery",
                                        blob_store=settings.get("blob_store"), top_k=int(settings["top_k"]),
                                        max_pixels=int(settings["max_pixels"]), nprobe=int(settings["ann_nprobe"]),
                                        rerank=int(settings["ann_rerank"]))
        self.version = settings.get("version")
        self.initialized = True

    def handle(self, data, context):
        bodies = []
        for idx, row in enumerate(data):
            body = row.get("data") if row.get("data") is not None else row.get("body")
            content_type = (context.get_request_header(idx, "Content-Type") or "").lower() if context else ""
            if content_type and not content_type.startswith(ACCEPTED_TYPES):
                body = RequestError(415, f"content type {content_type!r} is not accepted; send the raw bytes of a "
                                         "PNG or JPEG sketch with Content-Type image/png, image/jpeg or "
                                         "application/octet-stream (or none, as curl -T does)")
            bodies.append(body)
        answers = [None] * len(bodies)
        pending = [i for i, b in enumerate(bodies) if not isinstance(b, RequestError)]
        for i, b in enumerate(bodies):
            if isinstance(b, RequestError):
                answers[i] = b
        for i, answer in zip(pending, self.search.search([bodies[i] for i in pending])):
            answers[i] = answer
        out = []
        for idx, answer in enumerate(answers):
            if isinstance(answer, RequestError):
                if context is not None:
                    context.set_response_status(answer.status, answer.message[:120], idx)
                out.append({"error": answer.message, "status": answer.status})
            else:
                out.append(answer)
        return out
