"""tinkerd's benchmark suite: `python -m tests.bench --help`.

cli.py runs it; sdk.py holds the workloads as a tinker SDK client sees them; tenants.py
the multi-client workload (one process per tenant); raw.py the raw baseline (plain
torch + transformers, one process); floor.py the SDK floor (a stub server that answers
at once); spec.py what they all do; server.py starts tinkerd; models.py builds the
models; report.py writes the results.
"""
