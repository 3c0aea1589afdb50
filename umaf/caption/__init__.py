"""VLM captioning: the UMAF prompt and schema, backends, the Ray Data pipeline, the captions store."""
