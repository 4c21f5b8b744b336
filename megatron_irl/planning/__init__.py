"""Planning a launch without building it (``megatron-irl plan``): ``memory_estimate`` sizes
parameters and memory per GPU from a configuration; ``launch_report`` checks the
configuration for a launch and writes the report. No model is built, Megatron-Core is not
imported."""
