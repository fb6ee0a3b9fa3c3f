"""The research harness: the scaling-law experiments, each file a script of its own
(`python experiments/<name>.py --help`), and the modules they share (law, runner, noise, plots)."""
