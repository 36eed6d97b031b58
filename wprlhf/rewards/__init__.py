"""Where scores come from: the judges and simulated labelers, scalar-head reward models, the sentiment classifier,
and `spec.load_reward`, the one resolver of `--reward`, `--judge` and `--labeler sim:` SPECs."""
