"""A CPU stand-in for the parts of vLLM that ``ray.data.llm`` (ray 2.60) calls — and nothing else.

Put this folder (``tests/fake_vllm``) first on ``PYTHONPATH`` of the Ray nodes a test starts; the
caption job's real ``ray.data.llm`` processor then runs unchanged: ray's stage UDFs
(``PrepareMultimodalUDF``, ``ChatTemplateUDF``, ``TokenizeUDF``, ``vLLMEngineStageUDF``,
``DetokenizeUDF``), ray's ``vLLMEngineWrapper`` with its request preparation, semaphore, error
handling and output conversion, ``wrap_preprocess``/``wrap_postprocess`` and the Ray Data plan.
Only what ray imports from ``vllm`` is replaced, and its behaviour mirrors the real thing where the
job can observe it. Which ray 2.60 source each piece answers to
(``ray/llm/_internal/batch/stages/...``):

- ``vllm_engine_stage.py`` ``vLLMEngineWrapper.__init__`` (l.289-355): ``AsyncEngineArgs(**kw)``,
  ``.create_engine_config()`` → ``scheduler_config.max_num_seqs``,
  ``parallel_config.pipeline_parallel_size``; ``vllm.v1.metrics.ray_wrappers.RayPrometheusStatLogger``;
  ``AsyncLLMEngine.from_engine_args(engine_args, stat_loggers=...)``.
- ``_prepare_llm_request`` (l.404-487): ``vllm.SamplingParams(**params, structured_outputs=...)``
  and ``vllm.sampling_params.StructuredOutputsParams(**cfg)``; unknown sampling keys raise
  ``TypeError`` as vLLM's msgspec struct does.
- ``_generate_async`` (l.508-569): ``TokensPrompt``/``TextPrompt`` from ``vllm.inputs.llm``;
  ``engine.generate(request_id=, prompt=, sampling_params=, lora_request=)`` is an async stream of
  ``RequestOutput`` whose last item has ``finished=True``.
- ``vLLMOutputData.from_vllm_engine_output`` (l.178-229): ``isinstance(output,
  vllm.outputs.RequestOutput)``; ``prompt``, ``prompt_token_ids``, ``metrics``,
  ``outputs[0].token_ids/.text/.logprobs``, ``prompt_logprobs``. (``finish_reason`` exists here as
  in vLLM, and ray drops it: the caption rows never see it.)
- ``_generate_with_error_handling`` (l.710-785): an exception from the engine becomes ray's error
  row (``__inference_error__ = "<Type>: <message>"``) when ``should_continue_on_error``; the
  engine here raises what vLLM raises for the two row-level failures a caption run meets:
  ``ValueError("The decoder prompt (length N) is longer than the maximum model length of M. ...")``
  (vLLM's input processor) and Qwen2-VL's ``smart_resize`` ``ValueError("absolute aspect ratio must
  be smaller than 200, got R")`` (the model's image processor, run inside the engine).
  ``vllm.v1.engine.exceptions.EngineDeadError`` exists for ``ray/llm/_internal/common/errors.py``.
- ``prepare_multimodal_stage.py`` (l.30-147): ``vllm.config.ModelConfig(**kw)`` and
  ``vllm.entrypoints.chat_utils.parse_chat_messages_async(messages, model_config,
  content_format=)`` → ``(conversation, mm_data, mm_uuids)``: the image URL is fetched (here: data
  URLs only) and decoded to an RGB PIL image, and with ``content_format="string"`` the message
  content becomes the model's image placeholder(s), then the text parts, joined by newlines.

Test hooks (environment of the Ray nodes): ``FAKE_VLLM_RECORD_DIR`` — each engine writes one JSON
file there when it starts (pid, engine kwargs), so a test can count replicas and check the engine
arguments, and where Ray placed it (node id, the resources it reserved); ``FAKE_VLLM_SECONDS_PER_REQUEST`` — a delay per request (a run long enough to kill).
"""

from vllm._fake import (  # noqa: F401
    AsyncEngineArgs,
    AsyncLLMEngine,
    CompletionOutput,
    PoolingParams,
    PoolingRequestOutput,
    RequestOutput,
    SamplingParams,
)
from vllm import config, inputs, outputs, sampling_params  # noqa: F401,E402

__version__ = "0.0.0+fake"
