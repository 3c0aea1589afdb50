from vllm._fake import EngineDeadError  # noqa: F401
