# nbval runs the solution notebooks; the generated student notebooks raise NotImplementedError
# by design and are tested by tests/test_notebooks.py instead.
collect_ignore_glob = ["student/*"]
