"""Ray jobs: one module per pipeline stage, each runnable as ``python -m jobs.<stage> --config <yaml>``.

Jobs only wire library code from ``synadapt/`` onto Ray Data / Ray Train; :mod:`jobs.common` is the only module
that knows how a stage maps onto Ray.
"""
