"""breedlabel core: the ML library (breeds, data, images, models, training, bundle, runtime).

Imports no Ray. Heavy libraries (TensorFlow, OpenVINO) are imported inside the functions
that need them, so `import core.x` stays cheap for the CLI and the label workers.
"""
