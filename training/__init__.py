"""Train dropout-regularized Keras models and export them as MC-dropout SavedModel artifacts.

The flow, one module each: ``data`` -> ``model`` -> ``train`` -> ``mc_dropout`` -> ``export``
-> ``artifact`` (the contract the service reads).
"""


def __getattr__(name: str):
    # Lazy, so that the service can import training.artifact without loading Keras.
    if name == "export_model":
        from training.export import export_model

        return export_model
    raise AttributeError(f"module 'training' has no attribute {name!r}")
