from vllm._fake import CompletionOutput, PoolingRequestOutput, RequestOutput  # noqa: F401
