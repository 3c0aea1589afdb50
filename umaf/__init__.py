"""umaf: VLM captioning, UMAF / SPP-SCL training and sweeps for multimodal affective analysis on Ray.

The library holds small pure pieces (readers, prompt, models, losses); the Ray wiring lives in
``umaf.caption.pipeline``, ``umaf.train`` and ``umaf.tune`` and the thin entry points in ``jobs/``.
"""

__version__ = "0.1.0"
