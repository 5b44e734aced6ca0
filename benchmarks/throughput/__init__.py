"""The parts of ``benchmarks/train_throughput.py`` (the entry point, whose docstring describes the method)."""
