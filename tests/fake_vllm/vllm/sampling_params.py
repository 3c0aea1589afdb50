from vllm._fake import SamplingParams, StructuredOutputsParams  # noqa: F401
