"""`compress search`: the smallest artifact that passes the gate (docs/search.md).

`candidates.py` lists each layer's formats with their exact storage cost; `sensitivity.py`
measures what each layer group costs in KL when it alone takes a format, and a Hessian proxy
with its rank correlation; `allocate.py` finds the exact Pareto front of (bytes, predicted KL)
over per-group choices; `procedure.py` walks the front and simulates the error rate of the whole
procedure; `executor.py` runs the independent jobs in process or on Ray; `run.py` is the
command's steps; `config.py` the recipe's `search` section.
"""
