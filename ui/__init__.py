"""The Gradio layer: one module per tab (its layout, UI handlers and API endpoints), the shared Lens over the
engine, and the API registration. Everything model-related lives in utils/, which never imports gradio."""
