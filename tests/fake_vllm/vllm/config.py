from vllm._fake import ModelConfig  # noqa: F401


class PoolerConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
