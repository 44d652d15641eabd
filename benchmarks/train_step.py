"""The whole Llama training step per optimizer (forward, backward, update).

A thin command line over :mod:`llama_finetune.train_step` (where the
measuring code lives, importable by tests); see its docstring.

  PYTHONPATH=. python3 benchmarks/train_step.py --sizes llama2-7b \
      --batch 4 --seq 2048 --mem-budget 78 --json train_step_7b.json
  PYTHONPATH=. python3 benchmarks/train_step.py --tiny      # CPU smoke run
"""

from llama_finetune import train_step

if __name__ == "__main__":
  train_step.main()
