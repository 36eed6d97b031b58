"""Evaluation of policies on held-out prompts by judges they never trained on: the measures (win rates with CIs,
KL, diversity) and policies side by side, with blind pairs for people."""
