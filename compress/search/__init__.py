"""`compress search` (issue 33, in progress): the smallest artifact that passes the gate.

`candidates.py` lists each layer's formats with their exact storage cost; `sensitivity.py`
measures what each layer group costs in KL when it alone takes a format, and a Hessian proxy
with its rank correlation; `allocate.py` finds the exact Pareto front of (bytes, predicted KL)
over per-group choices. Still to come: the search under the gate, mixed-scheme artifacts, Ray,
the CLI and the report.
"""
