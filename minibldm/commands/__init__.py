"""Commands: what `python -m minibldm.sample`, `.train` and `.synth` run, and what they share."""
