"""The parts of `benchmarks/gpu_suite.py`: the steps that run in their own process (`steps`), the text encoder
that stands in for MiniLM where its package cannot travel (`stand_in`), and the Markdown report with the
issue's targets (`report`)."""
