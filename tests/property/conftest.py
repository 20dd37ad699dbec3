"""The property suite's hypothesis profile ("shardgate") is registered and loaded by the
root ``tests/conftest.py``, so property tests elsewhere in the tree get it too."""
