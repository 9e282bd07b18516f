"""The benchmark's scenarios, one module each (S1-S6, bench/README.md), and `main_proxies`, the
proxies S1, S2, S5 and the profiling runs share. Every `scenario_sN` takes the run's `Bench` and
returns an `Outcome`: its JSON section and its rows of the summary table.
"""
