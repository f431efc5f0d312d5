"""The model engine: loading (presets -> models), the step schedulers that run the model work (scheduler,
tasks, policy), and the facade (ModelEngine in engine.engine) that the application layer calls with plain
Python values."""
