"""``python -m llama_finetune``: see :mod:`llama_finetune.train`."""

from llama_finetune import train

if __name__ == "__main__":
  train.main()
