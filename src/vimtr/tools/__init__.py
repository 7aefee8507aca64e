"""Tools built on the models, reductions and engines: demo, benchmark, sweep, visualisation."""
