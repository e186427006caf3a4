"""breedlabel core: the ML library (breeds, data, images, models, training, bundle, runtime).

Imports no Ray. Heavy libraries (TensorFlow, OpenVINO) are imported inside the functions
that need them, so `import core.x` stays cheap for the CLI and the label workers.
"""
import os

# tf_keras (Keras 2) is the Keras every model here is built and saved with: TensorFlow reads this
# when it is first imported, and every TensorFlow import in the project comes after `import core`.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def installed_version() -> str | None:
    """breedlabel's version as pip installed it; None in a source tree that was not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("breedlabel")
    except importlib.metadata.PackageNotFoundError:
        return None
