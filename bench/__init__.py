"""The benchmarks of the rtl checkout; not part of the installed package. Run them with ``python -m bench``.

``harness`` is what every benchmark shares; ``bench_linear``, ``bench_conv2d`` and ``bench_models`` are the
benchmarks (cases, inputs, providers and float64 references); ``report`` summarises their CSVs under ``results/``.
"""
