"""opbench: LLM operator and collective micro-benchmarks that compose into end-to-end estimates."""

__version__ = "0.1.0"
