"""``TextPrompt``/``TokensPrompt`` are TypedDicts in vLLM: calling one gives a plain dict."""


def TextPrompt(**kwargs):  # noqa: N802
    return dict(kwargs)


def TokensPrompt(**kwargs):  # noqa: N802
    return dict(kwargs)
