"""The pricer task of the reference lesson: a synthetic product catalog (`catalog`), the task prompt, price
reading and metrics (`pricing`), evaluation of base and fine-tune through the seam (`evaluate`, also a CLI),
and LoRA training of the demo adapter (`train_adapter`, a CLI that trains with peft and transformers).

May import `utils.core` and `utils.analysis`; `utils.runtime` only lazily, inside the CLIs' functions (to load
their model); never ui or gradio.
"""
