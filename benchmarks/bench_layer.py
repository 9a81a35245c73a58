"""Layer benchmark (see moekit/benchmark.py): ``python benchmarks/bench_layer.py [--quick]`` from the repo root."""

from moekit.benchmark import main

if __name__ == "__main__":
    main()
