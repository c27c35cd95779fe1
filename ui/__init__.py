"""The Gradio layer: one module per tab (its class: API endpoints and UI handlers; its `layout()` function),
the shared `Lens` over the backend (`lens`), the API registration (`api`), what every tab shares (`common`), and
`views/`, what the page shows, built without gradio. Talks to the model only through `utils.core.seam.Backend`.
"""
