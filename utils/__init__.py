"""LoRA Lens internals: profiles, loading, generation, sizing, architecture and pricing.

Nothing in this package imports gradio; app.py is the only UI layer.
"""
