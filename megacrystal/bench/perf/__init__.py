"""The throughput model: a training step's time and memory per device for a model, a parallel layout and a
cluster, one concern a file (hardware, shapes and layouts, compute, communication, pipeline, memory), the layout
search behind `bench --plan`, calibration from a measured sweep, and the check against published runs."""
