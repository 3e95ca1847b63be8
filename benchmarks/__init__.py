"""hessopt's benchmark suite (optimizer step cost, HVP cost, diagnostics accuracy); run benchmarks/run.py."""
