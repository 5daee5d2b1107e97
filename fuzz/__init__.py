"""The fuzzers (fuzz_decode.py) and their targets; see fuzz/README.md."""
