"""The pricer task of the reference lesson: a synthetic product catalog (`catalog`), the task prompt, price
reading and metrics (`pricing`), evaluation of base and fine-tune through the seam (`evaluate`, also a CLI),
LoRA training of the demo adapter (`train_adapter`, a CLI that trains with peft and transformers), the
forgetting check (`forgetting`), and shipping (`ship`: the merge check with the task's metrics, the exports'
CLI).

May import `utils.core` and `utils.analysis`; `utils.runtime` only lazily, inside functions (the CLIs', to load
their model; `ship`'s exports, to write the adapter's files); never ui or gradio.
"""
