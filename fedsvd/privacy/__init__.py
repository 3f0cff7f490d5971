"""Differential privacy, by concern.

- ``accountants``: the accountants a run may name (imported by the config; no Opacus).
- ``accounting``: epsilon of a history of Poisson-sampled Gaussian mechanisms (RDP and PRV).
- ``calibration``: the noise multiplier that spends a target epsilon over a planned number of steps.
- ``budget``: the rule that lets a round run only within the target, for server and client alike.
- ``record_level``: DP-SGD on each client's records, and the client's and the server's ledgers.

Import from the module that holds a name: importing this package loads none of them.
"""
