"""The research harness: the scaling-law experiments and the cost sweep, each file a script of its own
(`python experiments/<name>.py --help`), and the modules they share (law, runner, noise, crossovers, plots)."""
