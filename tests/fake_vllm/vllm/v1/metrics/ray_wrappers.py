from vllm._fake import RayPrometheusStatLogger  # noqa: F401
