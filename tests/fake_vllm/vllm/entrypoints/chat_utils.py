from vllm._fake import parse_chat_messages_async  # noqa: F401
