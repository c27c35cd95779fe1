"""What the lens computes about a fine-tune, as plain data for the UI and the API to present.

- `token_lens`: every token of a text scored by base and fine-tune (through `Backend.score_rows`).
- `anatomy`: the adapter's update per layer and module (norms, singular values, ranks) from
  `Backend.adapter_weights()`, and ablation plans.
- `architecture`: printouts of the loaded and the reference model, folded, diffed and annotated.
- `sizing`: the adapter and base size math and its cross-checks (`python -m utils.analysis.sizing`).
- `token_lens`'s siblings: `pane_lens` (every text under every pane's model), `similarity` (two adapters
  compared layer by layer), `merge_check` (how much of the update each way of merging keeps).

May import `utils.core`; torch, transformers and peft to build models on the meta device (no weights); the
runtime's file readers lazily, inside functions. Runs a model only through the seam; never ui or gradio.
"""
