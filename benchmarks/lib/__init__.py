"""Code shared by the benchmark entry points: launching runs, reading Megatron-LM logs, kernel profiles."""
