"""Fine-tune a Llama checkpoint with any optimizer of the comparison.

* :mod:`llama_finetune.model` -- a Flax NNX Llama (RMSNorm, RoPE, SwiGLU,
  grouped-query attention; stacked-and-scanned or unrolled layers).
* :mod:`llama_finetune.checkpoint` -- loading (and writing) Hugging Face
  Llama checkpoints: ``config.json`` and ``*.safetensors``.
* :mod:`llama_finetune.data` -- token streams from a text or JSONL file, or
  the Python standard library's sources.
* :mod:`llama_finetune.train` -- the fine-tuning loop and its command line
  (``python -m llama_finetune --help``).
* :mod:`llama_finetune.train_step` -- the whole training step measured, per
  optimizer (``benchmarks/train_step.py``).

Needs the ``examples`` extra (Flax, Orbax, safetensors, matplotlib, tqdm).
"""
