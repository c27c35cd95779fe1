"""The pricer task of the reference lesson: a synthetic product catalog (`catalog`), the task prompt, price
reading and metrics (`pricing`), evaluation of base and fine-tune through the seam (`evaluate`, also a CLI),
and LoRA training of the demo adapter (`train_adapter`, a CLI).

May import `utils.core` and `utils.analysis`; the CLIs load their model through `utils.runtime`.
"""
