"""Demo workloads of the training-strategy benchmarks (a small DDPM)."""
