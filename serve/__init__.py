"""The serving layer: a Ray Serve graph with an OpenAI-compatible API over the adaptive reasoner (see app.py)."""
