"""Shared pytest options."""


def pytest_addoption(parser):
    # tests/test_fuzz.py: the issue-10 sizes (10,000 fuzzed actions, 1,000 of each other input) instead of CI's.
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="run the fuzz suite (tests/test_fuzz.py) at its long sizes; GHIL_FUZZ_EXAMPLES=N sets "
                          "every surface's example count instead")
