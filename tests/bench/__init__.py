"""tinkerd's benchmark suite: `python -m tests.bench --help`.

cli.py runs it; sdk.py holds the workloads as a tinker SDK client sees them; raw.py the
raw baseline (plain torch + transformers, one process); spec.py what both do;
server.py starts tinkerd; models.py builds the models; report.py writes the results.
"""
