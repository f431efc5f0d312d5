"""The model engine: loading (presets -> models), the workers that run model calls, and the facade
(ModelEngine in engine.engine) that the application layer calls with plain Python values."""
