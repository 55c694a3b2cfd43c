"""Parameter-space merge operators, one module per family.

`methods.py` declares every method (its parameters and defaults, plain data: no torch, so
reading recipes and search spaces stays light); `registry.py` runs a method on a tensor;
`materialize.py` writes a recipe's weights in place into one resident model.
"""
