"""What the lens computes about a fine-tune, as plain data for the UI and the API to present.

- `token_lens`: every token of a text scored by base and fine-tune (through `Backend.score_rows`).
- `anatomy`: the adapter's update per layer and module (norms, singular values, ranks) and ablation plans.
- `architecture`: printouts of the loaded and the reference model, folded, diffed and annotated.
- `sizing`: the adapter and base size math and its cross-checks (`python -m utils.analysis.sizing`).

May import `utils.core`; reads a model's weights only where it is handed them (the anatomy, the printouts,
the cross-checks), and runs a model only through the seam. Never imports `utils.runtime`'s engine or ui.
"""
