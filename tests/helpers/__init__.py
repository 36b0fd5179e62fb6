"""Helpers the tests share (plain functions and constants; fixtures live in ``tests/conftest.py``).

- :mod:`tests.helpers.cli`: the repository root, the real ``lopd`` CLI in a subprocess, and the
  arithmetic corpus ``lopd init-model`` trains tiny tokenizers on;
- :mod:`tests.helpers.seaweed`: a real SeaweedFS S3 server on loopback;
- :mod:`tests.helpers.inference`: inputs of the inference stages (sft-data, precompute): a prompts
  file and a tiny model that ends its turns often;
- :mod:`tests.helpers.training`: the training stages (sft, opd): publishing their inputs with the
  real schemas and manifests, recipes, running the entrypoints, reading their outputs;
- :mod:`tests.helpers.eval`: tiny math and code benchmark fixtures and their correct answers;
- :mod:`tests.helpers.models`: damaging a model's files in place (same size) to test fingerprints;
- :mod:`tests.helpers.prompts`: prompt files damaged the ways real ones are (non-UTF-8, truncated).

Test modules import from here (or get fixtures from ``conftest.py``), never from each other.
"""
